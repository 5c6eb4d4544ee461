# GSLB in Route 53, the same policy as the lab's geo router (geo_router/): every client
# gets the nearest region by latency, among the healthy ones; a region is healthy while its
# /health/ready answers (probed over HTTPS, `failure_threshold` consecutive failures mark it
# down, like the router's fall). A region with a failover buddy hands its users to that
# buddy first (PRIMARY/SECONDARY pair behind its latency record); without one, Route 53
# skips it and answers with the next nearest healthy region.
#
#   record_name  --latency, one per region-->  <region>.record_name  --failover-->  ALB(region)
#                                                                     (secondary) ALB(buddy)

locals {
  failover_name = { for name, r in var.regions : name => "${name}.${var.record_name}" }
}

resource "aws_route53_health_check" "region" {
  for_each          = var.regions
  fqdn              = each.value.alb_dns_name
  type              = "HTTPS"
  port              = 443
  resource_path     = var.health_check_path
  request_interval  = var.health_check_interval
  failure_threshold = var.failure_threshold
  measure_latency   = true
  enable_sni        = true
  tags              = merge(var.tags, { Name = "paycluster-${each.key}-ready" })
}

# The region itself while healthy...
resource "aws_route53_record" "primary" {
  for_each        = var.regions
  zone_id         = var.zone_id
  name            = local.failover_name[each.key]
  type            = "A"
  set_identifier  = "${each.key}-primary"
  health_check_id = aws_route53_health_check.region[each.key].id

  failover_routing_policy {
    type = "PRIMARY"
  }

  alias {
    name                   = each.value.alb_dns_name
    zone_id                = each.value.alb_zone_id
    evaluate_target_health = true
  }
}

# ... else its failover buddy.
resource "aws_route53_record" "secondary" {
  for_each        = { for name, backup in var.failover_order : name => backup if contains(keys(var.regions), name) }
  zone_id         = var.zone_id
  name            = local.failover_name[each.key]
  type            = "A"
  set_identifier  = "${each.key}-secondary-${each.value}"
  health_check_id = aws_route53_health_check.region[each.value].id

  failover_routing_policy {
    type = "SECONDARY"
  }

  alias {
    name                   = var.regions[each.value].alb_dns_name
    zone_id                = var.regions[each.value].alb_zone_id
    evaluate_target_health = true
  }
}

# The public name: nearest region by latency, healthy ones only.
resource "aws_route53_record" "latency" {
  for_each        = var.regions
  zone_id         = var.zone_id
  name            = var.record_name
  type            = "A"
  set_identifier  = each.key
  health_check_id = contains(keys(var.failover_order), each.key) ? null : aws_route53_health_check.region[each.key].id

  latency_routing_policy {
    region = each.value.aws_region
  }

  alias {
    name                   = local.failover_name[each.key]
    zone_id                = var.zone_id
    evaluate_target_health = true
  }

  depends_on = [aws_route53_record.primary, aws_route53_record.secondary]
}
