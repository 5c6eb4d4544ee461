variable "aws_region" {
  description = "AWS region the one-shot task runs in (any region whose VPC reaches every region's PostgreSQL)."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.aws_region))
    error_message = "aws_region must be an AWS region name such as us-east-1."
  }
}

variable "name_prefix" {
  description = "Prefix of resource names."
  type        = string
  default     = "paycluster"
}

variable "image" {
  description = "The paycluster container image (the task runs `paycluster deploy migrate` and `wire`)."
  type        = string

  validation {
    condition     = !endswith(var.image, ":latest") && length(split(":", var.image)) >= 2
    error_message = "Pin the image to a tag or digest, never :latest."
  }
}

variable "ecs_cluster_arn" {
  description = "ECS cluster the task runs in (the region module's)."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the task."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 1
    error_message = "Give at least one subnet."
  }
}

variable "security_group_ids" {
  description = "Security groups of the task (the region module's node tasks group reaches every region's PostgreSQL)."
  type        = list(string)
}

variable "kms_key_arn" {
  description = "KMS key (in aws_region) for the replication password secret and the task's logs."
  type        = string
}

variable "regions" {
  description = "Every region in cluster order (the first one creates the bootstrap rows): the outputs of its region module."
  type = list(object({
    name                = string
    postgres_endpoint   = string
    postgres_secret_arn = string
    redis_endpoint      = string
    grpc_endpoint       = string
    nats_url            = string
    kms_key_arn         = string
  }))

  validation {
    condition     = length(var.regions) >= 1 && length(distinct([for r in var.regions : r.name])) == length(var.regions)
    error_message = "regions must name each region once."
  }

  validation {
    condition     = alltrue([for r in var.regions : can(regex("^[^:]+:[0-9]+$", r.postgres_endpoint))])
    error_message = "postgres_endpoint must be host:port."
  }
}

variable "run_on_apply" {
  description = "Run the task (and wait for it) whenever the topology or the image changes; needs the AWS CLI where terraform runs. false: run it yourself (the output run_task_command)."
  type        = bool
  default     = true
}

variable "log_retention_days" {
  description = "Days the task's logs are kept."
  type        = number
  default     = 365

  validation {
    condition     = var.log_retention_days >= 365
    error_message = "Keep the wiring logs at least a year."
  }
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = {}
}
