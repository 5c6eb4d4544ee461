output "record_name" {
  description = "The public API name clients use."
  value       = var.record_name
}

output "health_check_ids" {
  description = "Route 53 health check per region (probing /health/ready)."
  value       = { for name, check in aws_route53_health_check.region : name => check.id }
}

output "regional_names" {
  description = "Per-region names (each a failover pair: the region, then its buddy)."
  value       = local.failover_name
}

output "failover_order" {
  description = "Region -> the region that takes its users while it is unhealthy."
  value       = var.failover_order
}
