# One paycluster region: its PostgreSQL 18 ledger (RDS, logical replication on), its
# Redis (ElastiCache), N region node tasks on ECS Fargate behind a public HTTPS load
# balancer (API) and an internal network load balancer (gRPC between regions, mutual TLS
# end to end), autoscaling, the region's certificate and secrets. Every resource sets
# `region`, so one provider configuration serves every region (AWS provider >= 6).

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  prefix = "${var.name_prefix}-${var.name}"
  others = [for r in var.cluster_regions : r if r != var.name]
  tags   = merge(var.tags, { "paycluster:region" = var.name })

  pg_host    = "pg.${var.name}.${var.internal_domain}"
  redis_host = "redis.${var.name}.${var.internal_domain}"
  grpc_host  = "grpc.${var.name}.${var.internal_domain}"
  pki_dir    = "/var/lib/paycluster/pki"

  # The same replication settings the lab starts PostgreSQL with (cluster/servers.py);
  # RDS spells wal_level=logical as rds.logical_replication.
  pg_parameters = {
    "rds.logical_replication"         = "1"
    "track_commit_timestamp"          = "1"
    "max_wal_senders"                 = "20"
    "max_replication_slots"           = "20"
    "max_logical_replication_workers" = "16"
    "max_worker_processes"            = "32"
    "wal_retrieve_retry_interval"     = "1000"
    "log_min_duration_statement"      = "1000"
    "log_statement"                   = "ddl"
  }

  node_environment = {
    PAYCLUSTER_REGION                  = var.name
    PAYCLUSTER_API_HOST                = "0.0.0.0"
    PAYCLUSTER_API_PORT                = "8000"
    PAYCLUSTER_GRPC_PORT               = "9000"
    PAYCLUSTER_DATABASE_URL            = "postgresql+psycopg://paycluster@${local.pg_host}:5432/paycluster?sslmode=verify-full&sslrootcert=system"
    PAYCLUSTER_NATS_URL                = var.nats_url
    PAYCLUSTER_PEERS                   = jsonencode({ for r in local.others : r => "grpc.${r}.${var.internal_domain}:9000" })
    PAYCLUSTER_TLS_CA_FILE             = "${local.pki_dir}/ca.crt"
    PAYCLUSTER_TLS_CERT_FILE           = "${local.pki_dir}/${var.name}.crt"
    PAYCLUSTER_TLS_KEY_FILE            = "${local.pki_dir}/${var.name}.key"
    PAYCLUSTER_REPLICATION_SLO_SECONDS = tostring(var.replication_slo_seconds)
  }

  redis_url       = "rediss://:${var.redis_auth_token}@${local.redis_host}:6379/0"
  lock_redis_urls = jsonencode({ for r in var.cluster_regions : r => "rediss://:${var.redis_auth_token}@redis.${r}.${var.internal_domain}:6379/0" })
}

# ------------------------------------------------------------------ encryption key

resource "aws_kms_key" "this" {
  region                  = var.region
  description             = "paycluster ${var.name}: ledger, Redis, secrets and logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministers"
        Effect    = "Allow"
        Principal = { AWS = "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "CloudWatchLogs"
        Effect    = "Allow"
        Principal = { Service = "logs.${var.region}.amazonaws.com" }
        Action    = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
      },
    ]
  })
  tags = local.tags
}

resource "aws_kms_alias" "this" {
  region        = var.region
  name          = "alias/${local.prefix}"
  target_key_id = aws_kms_key.this.key_id
}

# ------------------------------------------------------------------ the region's certificate

# EC P-256 like cluster/pki.py: gRPC between regions is mutual TLS, and a caller checks
# that the peer's certificate names the region it dialled (<region>.paycluster.internal).
resource "tls_private_key" "region" {
  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_cert_request" "region" {
  private_key_pem = tls_private_key.region.private_key_pem
  dns_names       = ["${var.name}.${var.internal_domain}", local.grpc_host]

  subject {
    common_name = "${var.name}.${var.internal_domain}"
  }
}

resource "tls_locally_signed_cert" "region" {
  cert_request_pem      = tls_cert_request.region.cert_request_pem
  ca_private_key_pem    = var.ca_private_key_pem
  ca_cert_pem           = var.ca_cert_pem
  validity_period_hours = 8760
  early_renewal_hours   = 720
  allowed_uses          = ["digital_signature", "key_agreement", "server_auth", "client_auth"]
}

resource "aws_secretsmanager_secret" "node" {
  #checkov:skip=CKV2_AWS_57:The secret holds the region's TLS certificate (reissued by terraform 30 days before expiry, early_renewal_hours) and the cluster-wide Redis token; Secrets Manager's Lambda rotation does not apply to either.
  region                  = var.region
  name                    = "${local.prefix}/node"
  description             = "paycluster ${var.name} node: TLS files and Redis URLs"
  kms_key_id              = aws_kms_key.this.arn
  recovery_window_in_days = 7
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "node" {
  region    = var.region
  secret_id = aws_secretsmanager_secret.node.id
  secret_string = jsonencode({
    tls_ca          = var.ca_cert_pem
    tls_cert        = tls_locally_signed_cert.region.cert_pem
    tls_key         = tls_private_key.region.private_key_pem
    redis_url       = local.redis_url
    lock_redis_urls = local.lock_redis_urls
  })
}

# ------------------------------------------------------------------ network

resource "aws_security_group" "alb" {
  region      = var.region
  name        = "${local.prefix}-api"
  description = "paycluster ${var.name} public API load balancer"
  vpc_id      = var.vpc_id
  tags        = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  region            = var.region
  security_group_id = aws_security_group.alb.id
  description       = "HTTPS from clients (Route 53 latency records point here)"
  cidr_ipv4         = "0.0.0.0/0"
  from_port         = 443
  to_port           = 443
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_egress_rule" "alb_to_nodes" {
  region            = var.region
  security_group_id = aws_security_group.alb.id
  description       = "To the node tasks' API port"
  cidr_ipv4         = var.vpc_cidr
  from_port         = 8000
  to_port           = 8000
  ip_protocol       = "tcp"
}

resource "aws_security_group" "nodes" {
  region      = var.region
  name        = "${local.prefix}-nodes"
  description = "paycluster ${var.name} region node tasks"
  vpc_id      = var.vpc_id
  tags        = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "nodes_api" {
  region                       = var.region
  security_group_id            = aws_security_group.nodes.id
  description                  = "API from the load balancer"
  referenced_security_group_id = aws_security_group.alb.id
  from_port                    = 8000
  to_port                      = 8000
  ip_protocol                  = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "nodes_health" {
  region            = var.region
  security_group_id = aws_security_group.nodes.id
  description       = "Readiness checks of the internal gRPC load balancer (/health/ready)"
  cidr_ipv4         = var.vpc_cidr
  from_port         = 8000
  to_port           = 8000
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "nodes_grpc" {
  for_each          = toset(concat([var.vpc_cidr], var.peer_cidrs))
  region            = var.region
  security_group_id = aws_security_group.nodes.id
  description       = "gRPC (mutual TLS) from the other regions, through the internal load balancer"
  cidr_ipv4         = each.value
  from_port         = 9000
  to_port           = 9000
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_egress_rule" "nodes_https" {
  region            = var.region
  security_group_id = aws_security_group.nodes.id
  description       = "AWS APIs (Secrets Manager, ECR, CloudWatch) and webhook receivers over HTTPS"
  cidr_ipv4         = "0.0.0.0/0"
  from_port         = 443
  to_port           = 443
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_egress_rule" "nodes_internal" {
  for_each = {
    for pair in setproduct(concat([var.vpc_cidr], var.peer_cidrs), [5432, 6379, 9000, 4222]) :
    "${pair[0]}-${pair[1]}" => { cidr = pair[0], port = pair[1] }
  }
  region            = var.region
  security_group_id = aws_security_group.nodes.id
  description       = "PostgreSQL, Redis, gRPC and NATS in this and the peered regions"
  cidr_ipv4         = each.value.cidr
  from_port         = each.value.port
  to_port           = each.value.port
  ip_protocol       = "tcp"
}

resource "aws_security_group" "data" {
  region      = var.region
  name        = "${local.prefix}-data"
  description = "paycluster ${var.name} PostgreSQL and Redis"
  vpc_id      = var.vpc_id
  tags        = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "data" {
  for_each = {
    for pair in setproduct(concat([var.vpc_cidr], var.peer_cidrs), [5432, 6379]) :
    "${pair[0]}-${pair[1]}" => { cidr = pair[0], port = pair[1] }
  }
  region            = var.region
  security_group_id = aws_security_group.data.id
  description       = "Nodes and jobs of this region; replication and the lock quorum from the peered regions"
  cidr_ipv4         = each.value.cidr
  from_port         = each.value.port
  to_port           = each.value.port
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_egress_rule" "data_replication" {
  for_each          = toset(var.peer_cidrs)
  region            = var.region
  security_group_id = aws_security_group.data.id
  description       = "Subscriptions to the other regions' PostgreSQL (logical replication)"
  cidr_ipv4         = each.value
  from_port         = 5432
  to_port           = 5432
  ip_protocol       = "tcp"
}

# ------------------------------------------------------------------ PostgreSQL 18

resource "aws_db_subnet_group" "this" {
  region     = var.region
  name       = local.prefix
  subnet_ids = var.private_subnet_ids
  tags       = local.tags
}

resource "aws_db_parameter_group" "this" {
  region      = var.region
  name        = "${local.prefix}-pg18"
  family      = "postgres18"
  description = "paycluster ${var.name}: logical replication between regions"

  dynamic "parameter" {
    for_each = local.pg_parameters
    content {
      name         = parameter.key
      value        = parameter.value
      apply_method = "pending-reboot"
    }
  }

  # Nodes, jobs and the other regions' subscriptions connect over TLS only.
  parameter {
    name         = "rds.force_ssl"
    value        = "1"
    apply_method = "pending-reboot"
  }

  tags = local.tags
}

resource "aws_iam_role" "rds_monitoring" {
  name = "${local.prefix}-rds-monitoring"
  assume_role_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [{ Effect = "Allow", Action = "sts:AssumeRole", Principal = { Service = "monitoring.rds.amazonaws.com" } }]
  })
  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_db_instance" "ledger" {
  region                                = var.region
  identifier                            = local.prefix
  engine                                = "postgres"
  engine_version                        = "18"
  instance_class                        = var.db_instance_class
  allocated_storage                     = var.db_allocated_storage
  max_allocated_storage                 = var.db_allocated_storage * 10
  storage_type                          = "gp3"
  storage_encrypted                     = true
  kms_key_id                            = aws_kms_key.this.arn
  db_name                               = "paycluster"
  username                              = "paycluster"
  manage_master_user_password           = true
  master_user_secret_kms_key_id         = aws_kms_key.this.arn
  iam_database_authentication_enabled   = true
  db_subnet_group_name                  = aws_db_subnet_group.this.name
  vpc_security_group_ids                = [aws_security_group.data.id]
  parameter_group_name                  = aws_db_parameter_group.this.name
  publicly_accessible                   = false
  multi_az                              = true
  deletion_protection                   = true
  backup_retention_period               = 14
  copy_tags_to_snapshot                 = true
  skip_final_snapshot                   = false
  final_snapshot_identifier             = "${local.prefix}-final"
  auto_minor_version_upgrade            = true
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.this.arn
  performance_insights_retention_period = 7
  monitoring_interval                   = 30
  monitoring_role_arn                   = aws_iam_role.rds_monitoring.arn
  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]
  tags                                  = local.tags
}

# ------------------------------------------------------------------ Redis

resource "aws_elasticache_subnet_group" "this" {
  region     = var.region
  name       = local.prefix
  subnet_ids = var.private_subnet_ids
  tags       = local.tags
}

resource "aws_elasticache_replication_group" "redis" {
  #checkov:skip=CKV_AWS_134:Redis holds only caches, rate-limit buckets and lock state. Restoring a snapshot would bring back old fencing tokens and leases; the lock service is built for a Redis that comes back empty (its quarantine), so backups are off on purpose.
  region                     = var.region
  replication_group_id       = local.prefix
  description                = "paycluster ${var.name}: idempotency fast path, rate limits, lock quorum member"
  engine                     = "redis"
  engine_version             = "7.1"
  node_type                  = var.redis_node_type
  num_cache_clusters         = 2
  port                       = 6379
  automatic_failover_enabled = true
  multi_az_enabled           = true
  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.this.arn
  transit_encryption_enabled = true
  auth_token                 = var.redis_auth_token
  subnet_group_name          = aws_elasticache_subnet_group.this.name
  security_group_ids         = [aws_security_group.data.id]
  snapshot_retention_limit   = 0
  auto_minor_version_upgrade = true
  tags                       = local.tags
}

# ------------------------------------------------------------------ private names

resource "aws_route53_record" "pg" {
  zone_id = var.internal_zone_id
  name    = local.pg_host
  type    = "CNAME"
  ttl     = 30
  records = [aws_db_instance.ledger.address]
}

resource "aws_route53_record" "redis" {
  zone_id = var.internal_zone_id
  name    = local.redis_host
  type    = "CNAME"
  ttl     = 30
  records = [aws_elasticache_replication_group.redis.primary_endpoint_address]
}

resource "aws_route53_record" "grpc" {
  zone_id = var.internal_zone_id
  name    = local.grpc_host
  type    = "A"

  alias {
    name                   = aws_lb.grpc.dns_name
    zone_id                = aws_lb.grpc.zone_id
    evaluate_target_health = true
  }
}

# ------------------------------------------------------------------ load balancers

resource "aws_lb" "api" {
  #checkov:skip=CKV2_AWS_76:The web ACL is the platform team's (var.waf_web_acl_arn) and its managed rule groups (Log4j included) are chosen there; the nodes run Python, not Java.
  region                     = var.region
  name                       = "${local.prefix}-api"
  load_balancer_type         = "application"
  internal                   = false
  subnets                    = var.public_subnet_ids
  security_groups            = [aws_security_group.alb.id]
  drop_invalid_header_fields = true
  desync_mitigation_mode     = "strictest"
  enable_deletion_protection = true

  access_logs {
    bucket  = var.alb_access_logs_bucket
    prefix  = local.prefix
    enabled = true
  }

  tags = local.tags
}

resource "aws_wafv2_web_acl_association" "api" {
  count        = var.waf_web_acl_arn == null ? 0 : 1
  region       = var.region
  resource_arn = aws_lb.api.arn
  web_acl_arn  = var.waf_web_acl_arn
}

resource "aws_lb_target_group" "api" {
  region               = var.region
  name                 = "${local.prefix}-api"
  port                 = 8000
  protocol             = "HTTP"
  target_type          = "ip"
  vpc_id               = var.vpc_id
  deregistration_delay = 15

  # The node's readiness: store, Redis, bus and replication SLO (a degraded region still
  # answers 200 and keeps its traffic, as in the lab's router).
  health_check {
    path                = "/health/ready"
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }

  tags = local.tags
}

resource "aws_lb_listener" "https" {
  region            = var.region
  load_balancer_arn = aws_lb.api.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }

  tags = local.tags
}

# gRPC between regions is mutual TLS from node to node: the load balancer passes TCP
# through and never terminates it.
resource "aws_lb" "grpc" {
  #checkov:skip=CKV_AWS_91:Internal TCP pass-through of mutually authenticated gRPC; the nodes log every call with its request id and trace, an NLB access log would add nothing but connection tuples.
  region                           = var.region
  name                             = "${local.prefix}-grpc"
  load_balancer_type               = "network"
  internal                         = true
  subnets                          = var.private_subnet_ids
  enable_deletion_protection       = true
  enable_cross_zone_load_balancing = true
  tags                             = local.tags
}

resource "aws_lb_target_group" "grpc" {
  region      = var.region
  name        = "${local.prefix}-grpc"
  port        = 9000
  protocol    = "TCP"
  target_type = "ip"
  vpc_id      = var.vpc_id

  health_check {
    protocol            = "HTTP"
    port                = "8000"
    path                = "/health/ready"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }

  tags = local.tags
}

resource "aws_lb_listener" "grpc" {
  #checkov:skip=CKV_AWS_2:TCP pass-through on purpose: the nodes speak mutual TLS end to end (region_node/rpc/tls.py); terminating TLS here would break the peer-certificate checks.
  #checkov:skip=CKV_AWS_103:Same: no TLS is terminated on this listener, the nodes negotiate TLS 1.3 themselves.
  region            = var.region
  load_balancer_arn = aws_lb.grpc.arn
  port              = 9000
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.grpc.arn
  }

  tags = local.tags
}

# ------------------------------------------------------------------ node tasks

resource "aws_cloudwatch_log_group" "nodes" {
  region            = var.region
  name              = "/paycluster/${var.name}/nodes"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = local.tags
}

resource "aws_ecs_cluster" "this" {
  region = var.region
  name   = local.prefix

  setting {
    name  = "containerInsights"
    value = "enabled"
  }

  tags = local.tags
}

resource "aws_iam_role" "execution" {
  name = "${local.prefix}-execution"
  assume_role_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [{ Effect = "Allow", Action = "sts:AssumeRole", Principal = { Service = "ecs-tasks.amazonaws.com" } }]
  })
  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

# The execution role reads the secrets the task definition names, nothing else.
resource "aws_iam_role_policy" "execution_secrets" {
  name = "secrets"
  role = aws_iam_role.execution.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Effect   = "Allow"
        Action   = ["secretsmanager:GetSecretValue"]
        Resource = [aws_secretsmanager_secret.node.arn, aws_db_instance.ledger.master_user_secret[0].secret_arn]
      },
      {
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = [aws_kms_key.this.arn]
      },
    ]
  })
}

# The nodes call no AWS API: their task role has no permissions.
resource "aws_iam_role" "task" {
  name = "${local.prefix}-task"
  assume_role_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [{ Effect = "Allow", Action = "sts:AssumeRole", Principal = { Service = "ecs-tasks.amazonaws.com" } }]
  })
  tags = local.tags
}

locals {
  node_secret = aws_secretsmanager_secret.node.arn
  db_secret   = aws_db_instance.ledger.master_user_secret[0].secret_arn
  log_options = {
    "awslogs-group"         = aws_cloudwatch_log_group.nodes.name
    "awslogs-region"        = var.region
    "awslogs-stream-prefix" = "node"
  }
}

resource "aws_ecs_task_definition" "node" {
  region                   = var.region
  family                   = "${local.prefix}-node"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.task_cpu
  memory                   = var.task_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  volume {
    name = "pki"
  }

  volume {
    name = "tmp"
  }

  container_definitions = jsonencode([
    {
      # The node reads its TLS files from disk (PAYCLUSTER_TLS_*_FILE); this step writes
      # them from Secrets Manager into a task-local volume, readable by the node's user only.
      name      = "tls-files"
      image     = var.image
      essential = false
      user      = "0"
      command = ["sh", "-c", join(" && ", [
        "umask 077",
        "printf '%s' \"$TLS_CA\" > ${local.pki_dir}/ca.crt",
        "printf '%s' \"$TLS_CERT\" > ${local.pki_dir}/${var.name}.crt",
        "printf '%s' \"$TLS_KEY\" > ${local.pki_dir}/${var.name}.key",
        "chown -R 10001:10001 ${local.pki_dir}",
      ])]
      readonlyRootFilesystem = true
      mountPoints            = [{ sourceVolume = "pki", containerPath = local.pki_dir }]
      secrets = [
        { name = "TLS_CA", valueFrom = "${local.node_secret}:tls_ca::" },
        { name = "TLS_CERT", valueFrom = "${local.node_secret}:tls_cert::" },
        { name = "TLS_KEY", valueFrom = "${local.node_secret}:tls_key::" },
      ]
      logConfiguration = { logDriver = "awslogs", options = local.log_options }
    },
    {
      name                   = "node"
      image                  = var.image
      essential              = true
      user                   = "10001:10001"
      command                = ["python", "-m", "region_node"]
      readonlyRootFilesystem = true
      portMappings = [
        { containerPort = 8000, protocol = "tcp", name = "api" },
        { containerPort = 9000, protocol = "tcp", name = "grpc" },
      ]
      dependsOn = [{ containerName = "tls-files", condition = "SUCCESS" }]
      mountPoints = [
        { sourceVolume = "pki", containerPath = local.pki_dir, readOnly = true },
        { sourceVolume = "tmp", containerPath = "/tmp" },
      ]
      environment = [for k, v in local.node_environment : { name = k, value = v }]
      secrets = [
        { name = "PGPASSWORD", valueFrom = "${local.db_secret}:password::" },
        { name = "PAYCLUSTER_REDIS_URL", valueFrom = "${local.node_secret}:redis_url::" },
        { name = "PAYCLUSTER_LOCK_REDIS_URLS", valueFrom = "${local.node_secret}:lock_redis_urls::" },
      ]
      healthCheck = {
        command     = ["CMD", "python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8000/health/ready', timeout=2)"]
        interval    = 10
        timeout     = 5
        retries     = 3
        startPeriod = 60
      }
      logConfiguration = { logDriver = "awslogs", options = local.log_options }
    },
  ])

  tags = local.tags
}

resource "aws_ecs_service" "node" {
  region                            = var.region
  name                              = "node"
  cluster                           = aws_ecs_cluster.this.id
  task_definition                   = aws_ecs_task_definition.node.arn
  desired_count                     = var.nodes.desired
  launch_type                       = "FARGATE"
  health_check_grace_period_seconds = 90
  propagate_tags                    = "SERVICE"
  enable_execute_command            = false

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.nodes.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.api.arn
    container_name   = "node"
    container_port   = 8000
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.grpc.arn
    container_name   = "node"
    container_port   = 9000
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  # Autoscaling owns the count once the service exists.
  lifecycle {
    ignore_changes = [desired_count]
  }

  depends_on = [aws_lb_listener.https, aws_lb_listener.grpc]
  tags       = local.tags
}

# ------------------------------------------------------------------ autoscaling

resource "aws_appautoscaling_target" "nodes" {
  region             = var.region
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.this.name}/${aws_ecs_service.node.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.nodes.min
  max_capacity       = var.nodes.max
}

resource "aws_appautoscaling_policy" "cpu" {
  region             = var.region
  name               = "${local.prefix}-cpu"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.nodes.service_namespace
  resource_id        = aws_appautoscaling_target.nodes.resource_id
  scalable_dimension = aws_appautoscaling_target.nodes.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = 60
    scale_in_cooldown  = 120
    scale_out_cooldown = 30

    predefined_metric_specification {
      predefined_metric_type = "ECSServiceAverageCPUUtilization"
    }
  }
}

resource "aws_appautoscaling_policy" "requests" {
  region             = var.region
  name               = "${local.prefix}-requests"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.nodes.service_namespace
  resource_id        = aws_appautoscaling_target.nodes.resource_id
  scalable_dimension = aws_appautoscaling_target.nodes.scalable_dimension

  target_tracking_scaling_policy_configuration {
    # About what one node sustains at a comfortable p99 (bench/README.md: payments/s per
    # node on two cores), per minute.
    target_value       = 3000
    scale_in_cooldown  = 120
    scale_out_cooldown = 30

    predefined_metric_specification {
      predefined_metric_type = "ALBRequestCountPerTarget"
      resource_label         = "${aws_lb.api.arn_suffix}/${aws_lb_target_group.api.arn_suffix}"
    }
  }
}
