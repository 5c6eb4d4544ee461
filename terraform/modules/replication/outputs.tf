output "task_definition_arn" {
  description = "The one-shot task that migrates every region and wires replication."
  value       = aws_ecs_task_definition.wire.arn
}

output "replication_password_secret_arn" {
  description = "Secret with the replication role's password."
  value       = aws_secretsmanager_secret.replication.arn
}

output "run_task_command" {
  description = "Run the wiring yourself (e.g. after adding a region, with run_on_apply = false)."
  value       = "aws ecs run-task --region ${var.aws_region} --cluster ${var.ecs_cluster_arn} --launch-type FARGATE --task-definition ${aws_ecs_task_definition.wire.arn} --network-configuration 'awsvpcConfiguration={subnets=[${join(",", var.subnet_ids)}],securityGroups=[${join(",", var.security_group_ids)}],assignPublicIp=DISABLED}'"
}

output "log_group_name" {
  description = "Where the task logs (one JSON line per step)."
  value       = aws_cloudwatch_log_group.task.name
}
