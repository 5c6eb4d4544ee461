# Replication between the regions' managed PostgreSQL 18, wired by the project's own
# commands in a one-shot ECS task: `paycluster deploy migrate` (the schema on every region:
# DDL does not replicate) and `paycluster deploy wire` (a publication per region, and a
# subscription of every region to every other with origin = none, logging in as the
# replication role with its password). Both are idempotent, so the task runs again
# whenever the topology or the image changes.

locals {
  prefix = "${var.name_prefix}-replication"

  # The topology file cluster/deploy.py reads; managed PostgreSQL: no TLS gateways, the
  # subscriptions reach each publisher's own address (RDS enforces TLS, rds.force_ssl).
  topology = jsonencode({
    regions = [for i, r in var.regions : {
      name     = r.name
      postgres = r.postgres_endpoint
      database = "paycluster"
      user     = "paycluster"
      # The RDS-managed master password of region i, from its secret (see `secrets`).
      password_env = "PGPASS_${i}"
      grpc         = r.grpc_endpoint
      redis        = r.redis_endpoint
      nats         = trimprefix(trimprefix(r.nats_url, "nats://"), "tls://")
    }]
    pki_dir                  = "/tmp/pki"
    secrets_dir              = "/tmp/secrets"
    wan                      = { host = "", rtt_scale = 0 }
    replication_user         = "paycluster_repl"
    replication_password_env = "REPLICATION_PASSWORD"
  })
}

resource "random_password" "replication" {
  length  = 40
  special = false
}

resource "aws_secretsmanager_secret" "replication" {
  #checkov:skip=CKV2_AWS_57:Rotating this password means re-running the wiring task (ALTER SUBSCRIPTION ... CONNECTION on every region); it is rotated by changing `random_password.replication` (terraform apply -replace), not by a Lambda.
  region                  = var.aws_region
  name                    = "${local.prefix}/password"
  description             = "Password of the paycluster_repl role subscriptions log in as"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 7
  tags                    = var.tags
}

resource "aws_secretsmanager_secret_version" "replication" {
  region        = var.aws_region
  secret_id     = aws_secretsmanager_secret.replication.id
  secret_string = random_password.replication.result
}

resource "aws_cloudwatch_log_group" "task" {
  region            = var.aws_region
  name              = "/paycluster/replication"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

resource "aws_iam_role" "execution" {
  name = "${local.prefix}-execution"
  assume_role_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [{ Effect = "Allow", Action = "sts:AssumeRole", Principal = { Service = "ecs-tasks.amazonaws.com" } }]
  })
  tags = var.tags
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

resource "aws_iam_role_policy" "execution_secrets" {
  name = "secrets"
  role = aws_iam_role.execution.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Effect   = "Allow"
        Action   = ["secretsmanager:GetSecretValue"]
        Resource = concat([aws_secretsmanager_secret.replication.arn], [for r in var.regions : r.postgres_secret_arn])
      },
      {
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = distinct(concat([var.kms_key_arn], [for r in var.regions : r.kms_key_arn]))
      },
    ]
  })
}

resource "aws_ecs_task_definition" "wire" {
  region                   = var.aws_region
  family                   = local.prefix
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 512
  memory                   = 1024
  execution_role_arn       = aws_iam_role.execution.arn

  volume {
    name = "tmp"
  }

  container_definitions = jsonencode([{
    name                   = "wire"
    image                  = var.image
    essential              = true
    user                   = "10001:10001"
    readonlyRootFilesystem = true
    mountPoints            = [{ sourceVolume = "tmp", containerPath = "/tmp" }]
    command = ["sh", "-c", join(" && ", [
      "umask 077",
      "printf '%s' \"$TOPOLOGY_JSON\" > /tmp/topology.json",
      "paycluster deploy migrate --topology /tmp/topology.json",
      "paycluster deploy wire --topology /tmp/topology.json",
    ])]
    environment = [{ name = "TOPOLOGY_JSON", value = local.topology }]
    secrets = concat(
      [{ name = "REPLICATION_PASSWORD", valueFrom = aws_secretsmanager_secret.replication.arn }],
      [for i, r in var.regions : { name = "PGPASS_${i}", valueFrom = "${r.postgres_secret_arn}:password::" }],
    )
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        "awslogs-group"         = aws_cloudwatch_log_group.task.name
        "awslogs-region"        = var.aws_region
        "awslogs-stream-prefix" = "wire"
      }
    }
  }])

  tags = var.tags
}

# Runs the task and fails the apply unless it exits 0.
resource "terraform_data" "run" {
  count            = var.run_on_apply ? 1 : 0
  triggers_replace = [aws_ecs_task_definition.wire.arn, sha256(local.topology)]

  provisioner "local-exec" {
    interpreter = ["/bin/bash", "-c"]
    command     = <<-EOT
      set -euo pipefail
      arn=$(aws ecs run-task --region '${var.aws_region}' --cluster '${var.ecs_cluster_arn}' \
        --launch-type FARGATE --task-definition '${aws_ecs_task_definition.wire.arn}' \
        --network-configuration 'awsvpcConfiguration={subnets=[${join(",", var.subnet_ids)}],securityGroups=[${join(",", var.security_group_ids)}],assignPublicIp=DISABLED}' \
        --query 'tasks[0].taskArn' --output text)
      aws ecs wait tasks-stopped --region '${var.aws_region}' --cluster '${var.ecs_cluster_arn}' --tasks "$arn"
      code=$(aws ecs describe-tasks --region '${var.aws_region}' --cluster '${var.ecs_cluster_arn}' \
        --tasks "$arn" --query 'tasks[0].containers[0].exitCode' --output text)
      test "$code" = 0 || { echo "paycluster deploy migrate/wire exited $code; see log group ${aws_cloudwatch_log_group.task.name}" >&2; exit 1; }
    EOT
  }
}
