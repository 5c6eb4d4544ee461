output "name" {
  description = "The paycluster region name (PAYCLUSTER_REGION)."
  value       = var.name
}

output "aws_region" {
  description = "The AWS region it runs in."
  value       = var.region
}

output "api_dns_name" {
  description = "DNS name of the public API load balancer (the GSLB's alias target)."
  value       = aws_lb.api.dns_name
}

output "api_zone_id" {
  description = "Hosted zone of the API load balancer (for Route 53 alias records)."
  value       = aws_lb.api.zone_id
}

output "health_check_path" {
  description = "The readiness path the load balancer and the GSLB probe."
  value       = aws_lb_target_group.api.health_check[0].path
}

output "grpc_endpoint" {
  description = "Where the other regions' nodes reach this region over gRPC (mutual TLS)."
  value       = "${local.grpc_host}:9000"
}

output "postgres_endpoint" {
  description = "host:port of the region's PostgreSQL 18 (private name), for replication and jobs."
  value       = "${local.pg_host}:5432"
}

output "postgres_secret_arn" {
  description = "Secrets Manager secret (managed by RDS) with the ledger database's master credentials."
  value       = aws_db_instance.ledger.master_user_secret[0].secret_arn
}

output "redis_endpoint" {
  description = "host:port of the region's Redis (private name, TLS)."
  value       = "${local.redis_host}:6379"
}

output "node_secret_arn" {
  description = "Secrets Manager secret with the node's TLS files and Redis URLs."
  value       = aws_secretsmanager_secret.node.arn
}

output "kms_key_arn" {
  description = "The region's KMS key (ledger, Redis, secrets, logs)."
  value       = aws_kms_key.this.arn
}

output "ecs_cluster_arn" {
  description = "ECS cluster of the region's node tasks (one-shot jobs run here too)."
  value       = aws_ecs_cluster.this.arn
}

output "node_service_name" {
  description = "ECS service of the region nodes."
  value       = aws_ecs_service.node.name
}

output "task_security_group_id" {
  description = "Security group of the node tasks (give it to one-shot jobs that reach the stores)."
  value       = aws_security_group.nodes.id
}

output "private_subnet_ids" {
  description = "Private subnets the tasks run in."
  value       = var.private_subnet_ids
}

output "execution_role_arn" {
  description = "Task execution role (pulls the image, reads the node's secrets)."
  value       = aws_iam_role.execution.arn
}

output "log_group_name" {
  description = "CloudWatch log group of the node tasks (one JSON line per event)."
  value       = aws_cloudwatch_log_group.nodes.name
}
