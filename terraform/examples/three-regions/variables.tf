variable "home_region" {
  description = "AWS region of the provider's default endpoint (global resources: IAM, Route 53)."
  type        = string
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.home_region))
    error_message = "home_region must be an AWS region name such as us-east-1."
  }
}

variable "image" {
  description = "The paycluster image (built from the repository's Dockerfile), pinned by tag or digest."
  type        = string

  validation {
    condition     = !endswith(var.image, ":latest") && length(split(":", var.image)) >= 2
    error_message = "Pin the image to a tag or digest, never :latest."
  }
}

variable "regions" {
  description = "The paycluster regions and the network each runs in (the VPCs must reach each other: peering or a transit gateway)."
  type = map(object({
    aws_region             = string
    vpc_id                 = string
    vpc_cidr               = string
    private_subnet_ids     = list(string)
    public_subnet_ids      = list(string)
    certificate_arn        = string
    alb_access_logs_bucket = string
  }))

  validation {
    condition     = length(var.regions) >= 2
    error_message = "An active-active cluster needs at least two regions."
  }
}

variable "region_order" {
  description = "Cluster order of the regions (the first makes the bootstrap rows and runs the wiring task)."
  type        = list(string)
  default     = ["us-east", "eu-west", "ap-southeast"]

  validation {
    condition     = length(distinct(var.region_order)) == length(var.region_order) && length(var.region_order) >= 2
    error_message = "region_order must name each region once (at least two)."
  }
}

variable "failover_order" {
  description = "Region -> the region that takes its users when it is unhealthy (the lab's buddies)."
  type        = map(string)
  default = {
    us-east      = "eu-west"
    eu-west      = "us-east"
    ap-southeast = "eu-west"
  }

  validation {
    condition     = alltrue([for r, backup in var.failover_order : r != backup])
    error_message = "A region cannot be its own failover target."
  }
}

variable "public_zone_id" {
  description = "Public Route 53 zone of the API name."
  type        = string
}

variable "api_name" {
  description = "The API's public name (latency records per region)."
  type        = string

  validation {
    condition     = can(regex("^([a-z0-9-]+\\.)+[a-z]{2,}$", var.api_name))
    error_message = "api_name must be a fully qualified DNS name in lower case."
  }
}

variable "nats_urls" {
  description = "NATS JetStream URL per region (the outbox relay's bus)."
  type        = map(string)

  validation {
    condition     = alltrue([for u in values(var.nats_urls) : can(regex("^(nats|tls)://", u))])
    error_message = "NATS URLs start with nats:// or tls://."
  }
}

variable "nodes" {
  description = "Node tasks per region: desired, min, max."
  type = object({
    desired = number
    min     = number
    max     = number
  })
  default = { desired = 2, min = 2, max = 10 }

  validation {
    condition     = var.nodes.min >= 2 && var.nodes.min <= var.nodes.desired && var.nodes.desired <= var.nodes.max
    error_message = "Need 2 <= min <= desired <= max."
  }
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = { project = "paycluster" }
}
