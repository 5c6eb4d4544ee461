output "api_url" {
  description = "The cluster's public API: the nearest healthy region answers."
  value       = "https://${module.gslb.record_name}"
}

output "regional_api_names" {
  description = "Per-region names (the region, or its failover buddy while it is down)."
  value       = module.gslb.regional_names
}

output "health_check_ids" {
  description = "Route 53 health check per region."
  value       = module.gslb.health_check_ids
}

output "regions" {
  description = "Per region: load balancer, gRPC and store endpoints, log group."
  value = { for name, r in module.region : name => {
    aws_region        = r.aws_region
    api_dns_name      = r.api_dns_name
    grpc_endpoint     = r.grpc_endpoint
    postgres_endpoint = r.postgres_endpoint
    redis_endpoint    = r.redis_endpoint
    log_group         = r.log_group_name
  } }
}

output "replication_task" {
  description = "Re-run the migration and wiring task (e.g. after adding a region)."
  value       = module.replication.run_task_command
}

output "ca_cert_pem" {
  description = "The cluster CA certificate (public), to verify the regions' gRPC certificates."
  value       = tls_self_signed_cert.ca.cert_pem
}
