variable "zone_id" {
  description = "Public Route 53 hosted zone that holds the API name."
  type        = string
}

variable "record_name" {
  description = "The API's public name, e.g. api.pay.example.com: one latency record per region."
  type        = string

  validation {
    condition     = can(regex("^([a-z0-9-]+\\.)+[a-z]{2,}$", var.record_name))
    error_message = "record_name must be a fully qualified DNS name in lower case."
  }
}

variable "regions" {
  description = "Every region: its AWS region (the latency record's region) and its API load balancer (alias target)."
  type = map(object({
    aws_region   = string
    alb_dns_name = string
    alb_zone_id  = string
  }))

  validation {
    condition     = length(var.regions) >= 1
    error_message = "Give at least one region."
  }
}

variable "failover_order" {
  description = "For each region, the region that takes its users while it is unhealthy (its failover buddy; the lab's durability buddy is the natural choice). Regions not listed fall back to the next nearest healthy region through the latency records."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for r, backup in var.failover_order : r != backup])
    error_message = "A region cannot be its own failover target."
  }

  validation {
    condition     = alltrue([for r, backup in var.failover_order : contains(keys(var.regions), r) && contains(keys(var.regions), backup)])
    error_message = "failover_order may name only regions given in var.regions."
  }
}

variable "health_check_path" {
  description = "Readiness path probed on every region (the nodes' /health/ready, as the lab's geo router probes)."
  type        = string
  default     = "/health/ready"

  validation {
    condition     = startswith(var.health_check_path, "/")
    error_message = "health_check_path must start with /."
  }
}

variable "health_check_interval" {
  description = "Seconds between probes from each checker (10 or 30)."
  type        = number
  default     = 10

  validation {
    condition     = contains([10, 30], var.health_check_interval)
    error_message = "Route 53 probes every 10 or 30 seconds."
  }
}

variable "failure_threshold" {
  description = "Consecutive failed probes before a region is unhealthy (the lab router's `fall`)."
  type        = number
  default     = 3

  validation {
    condition     = var.failure_threshold >= 1 && var.failure_threshold <= 10
    error_message = "failure_threshold must be 1-10."
  }
}

variable "ttl" {
  description = "TTL (seconds) of the failover records; alias records take the load balancer's."
  type        = number
  default     = 30

  validation {
    condition     = var.ttl >= 5 && var.ttl <= 300
    error_message = "ttl must be 5-300 seconds."
  }
}

variable "tags" {
  description = "Tags on the health checks."
  type        = map(string)
  default     = {}
}
