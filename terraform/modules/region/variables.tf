variable "region" {
  description = "AWS region this paycluster region runs in, e.g. us-east-1 (set on every resource: AWS provider >= 6)."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "region must be an AWS region name such as us-east-1."
  }
}

variable "name" {
  description = "paycluster region name (PAYCLUSTER_REGION): one of the names ids are stamped with, e.g. us-east."
  type        = string

  validation {
    condition     = contains(["us-east", "eu-west", "ap-southeast", "us-west", "eu-central", "sa-east"], var.name)
    error_message = "name must be a paycluster region name (region_node/regions.py): us-east, eu-west, ap-southeast, us-west, eu-central or sa-east."
  }
}

variable "cluster_regions" {
  description = "Every paycluster region name of the cluster (this one included): the node's peers and lock quorum."
  type        = list(string)

  validation {
    condition     = length(var.cluster_regions) >= 1 && length(distinct(var.cluster_regions)) == length(var.cluster_regions)
    error_message = "cluster_regions must list distinct region names."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name."
  type        = string
  default     = "paycluster"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name_prefix))
    error_message = "name_prefix must be 2-21 lower-case letters, digits or dashes, starting with a letter."
  }
}

variable "vpc_id" {
  description = "VPC of this region (the platform team's network)."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR of the VPC (tasks, database and Redis talk inside it)."
  type        = string

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0))
    error_message = "vpc_cidr must be a CIDR block."
  }
}

variable "peer_cidrs" {
  description = "CIDRs of the other regions' VPCs (peered or behind a transit gateway): replication, gRPC and the lock quorum come from there."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.peer_cidrs : can(cidrhost(c, 0))])
    error_message = "peer_cidrs must be CIDR blocks."
  }
}

variable "private_subnet_ids" {
  description = "Private subnets (at least two zones) for tasks, PostgreSQL, Redis and the internal gRPC load balancer."
  type        = list(string)

  validation {
    condition     = length(var.private_subnet_ids) >= 2
    error_message = "Give at least two private subnets in different availability zones."
  }
}

variable "public_subnet_ids" {
  description = "Public subnets (at least two zones) for the API load balancer."
  type        = list(string)

  validation {
    condition     = length(var.public_subnet_ids) >= 2
    error_message = "Give at least two public subnets in different availability zones."
  }
}

variable "image" {
  description = "The paycluster container image (Dockerfile), by digest or an immutable tag."
  type        = string

  validation {
    condition     = !endswith(var.image, ":latest") && length(split(":", var.image)) >= 2
    error_message = "Pin the image to a tag or digest, never :latest."
  }
}

variable "nodes" {
  description = "Region node tasks: desired, minimum and maximum count for autoscaling."
  type = object({
    desired = number
    min     = number
    max     = number
  })
  default = { desired = 2, min = 2, max = 10 }

  validation {
    condition     = var.nodes.min >= 2 && var.nodes.min <= var.nodes.desired && var.nodes.desired <= var.nodes.max
    error_message = "Need 2 <= min <= desired <= max (two nodes at least, so a region survives a task's loss)."
  }
}

variable "task_cpu" {
  description = "Fargate CPU units per node task."
  type        = number
  default     = 1024

  validation {
    condition     = contains([256, 512, 1024, 2048, 4096, 8192, 16384], var.task_cpu)
    error_message = "task_cpu must be a Fargate CPU size."
  }
}

variable "task_memory" {
  description = "Fargate memory (MiB) per node task."
  type        = number
  default     = 2048

  validation {
    condition     = var.task_memory >= 512 && var.task_memory <= 122880
    error_message = "task_memory must be between 512 and 122880 MiB."
  }
}

variable "db_instance_class" {
  description = "RDS instance class of the region's PostgreSQL 18."
  type        = string
  default     = "db.r7g.large"

  validation {
    condition     = startswith(var.db_instance_class, "db.")
    error_message = "db_instance_class must be an RDS instance class (db.*)."
  }
}

variable "db_allocated_storage" {
  description = "Initial storage (GiB) of the ledger database; it grows up to 10x on its own."
  type        = number
  default     = 100

  validation {
    condition     = var.db_allocated_storage >= 20
    error_message = "db_allocated_storage must be at least 20 GiB."
  }
}

variable "redis_node_type" {
  description = "ElastiCache node type of the region's Redis (idempotency fast path, rate limits, lock quorum)."
  type        = string
  default     = "cache.r7g.large"

  validation {
    condition     = startswith(var.redis_node_type, "cache.")
    error_message = "redis_node_type must be an ElastiCache node type (cache.*)."
  }
}

variable "redis_auth_token" {
  description = "AUTH token of every region's Redis (one for the cluster: a node reaches every region's Redis for the lock quorum)."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.redis_auth_token) >= 16 && length(var.redis_auth_token) <= 128
    error_message = "redis_auth_token must be 16-128 characters."
  }
}

variable "nats_url" {
  description = "NATS JetStream URL the region's outbox relay publishes to (nats:// or tls://)."
  type        = string

  validation {
    condition     = can(regex("^(nats|tls)://", var.nats_url))
    error_message = "nats_url must start with nats:// or tls://."
  }
}

variable "certificate_arn" {
  description = "ACM certificate of the public API name (HTTPS listener)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:acm:", var.certificate_arn))
    error_message = "certificate_arn must be an ACM certificate ARN."
  }
}

variable "internal_zone_id" {
  description = "Route 53 private hosted zone (var.internal_domain) shared by every region's VPC: pg.<name>, redis.<name> and grpc.<name> records go there."
  type        = string
}

variable "internal_domain" {
  description = "Domain of the private zone; also the suffix of the regions' certificate names (<name>.paycluster.internal)."
  type        = string
  default     = "paycluster.internal"
}

variable "ca_cert_pem" {
  description = "The cluster CA certificate (PEM); every region's certificate is issued by it."
  type        = string
  sensitive   = true
}

variable "ca_private_key_pem" {
  description = "The cluster CA key (PEM), used only to sign this region's certificate."
  type        = string
  sensitive   = true
}

variable "replication_slo_seconds" {
  description = "Convergence SLO per region pair (PAYCLUSTER_REPLICATION_SLO_SECONDS)."
  type        = number
  default     = 30

  validation {
    condition     = var.replication_slo_seconds > 0 && var.replication_slo_seconds <= 300
    error_message = "replication_slo_seconds must be in (0, 300]."
  }
}

variable "alb_access_logs_bucket" {
  description = "S3 bucket (in this region) for the API load balancer's access logs."
  type        = string
}

variable "waf_web_acl_arn" {
  description = "WAFv2 web ACL to attach to the API load balancer (null: none)."
  type        = string
  default     = null
}

variable "log_retention_days" {
  description = "Days the node logs are kept in CloudWatch."
  type        = number
  default     = 365

  validation {
    condition     = contains([365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a CloudWatch retention of at least a year."
  }
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = {}
}
