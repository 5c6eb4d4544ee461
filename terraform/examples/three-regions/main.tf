# Three paycluster regions (us-east-1, eu-west-1, ap-southeast-1), the GSLB in front of
# them, and replication wired between them. Walk-through: README.md beside this file.

# ------------------------------------------------------------------ the cluster CA

# The same kind of CA cluster/pki.py makes for the lab: EC P-256, ten years. Its key lives
# only in the state (keep the state encrypted and access-controlled).
resource "tls_private_key" "ca" {
  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_self_signed_cert" "ca" {
  private_key_pem       = tls_private_key.ca.private_key_pem
  is_ca_certificate     = true
  validity_period_hours = 87600
  allowed_uses          = ["cert_signing", "crl_signing", "digital_signature"]

  subject {
    common_name = "paycluster cluster CA"
  }
}

# One token for every region's Redis: each node reaches all of them (the lock quorum).
resource "random_password" "redis" {
  length  = 48
  special = false
}

# ------------------------------------------------------------------ private names

resource "aws_route53_zone" "internal" {
  name    = "paycluster.internal"
  comment = "paycluster: pg.<region>, redis.<region>, grpc.<region>"

  dynamic "vpc" {
    for_each = var.regions
    content {
      vpc_id     = vpc.value.vpc_id
      vpc_region = vpc.value.aws_region
    }
  }
}

# ------------------------------------------------------------------ regions

module "region" {
  source   = "../../modules/region"
  for_each = var.regions

  region             = each.value.aws_region
  name               = each.key
  cluster_regions    = var.region_order
  vpc_id             = each.value.vpc_id
  vpc_cidr           = each.value.vpc_cidr
  peer_cidrs         = [for name, r in var.regions : r.vpc_cidr if name != each.key]
  private_subnet_ids = each.value.private_subnet_ids
  public_subnet_ids  = each.value.public_subnet_ids
  image              = var.image
  nodes              = var.nodes
  redis_auth_token   = random_password.redis.result
  nats_url           = var.nats_urls[each.key]
  certificate_arn    = each.value.certificate_arn
  internal_zone_id   = aws_route53_zone.internal.zone_id
  ca_cert_pem        = tls_self_signed_cert.ca.cert_pem
  ca_private_key_pem = tls_private_key.ca.private_key_pem

  alb_access_logs_bucket = each.value.alb_access_logs_bucket
  tags                   = var.tags
}

# ------------------------------------------------------------------ GSLB

module "gslb" {
  source = "../../modules/gslb"

  zone_id     = var.public_zone_id
  record_name = var.api_name
  regions = { for name, r in module.region : name => {
    aws_region   = r.aws_region
    alb_dns_name = r.api_dns_name
    alb_zone_id  = r.api_zone_id
  } }
  failover_order = var.failover_order
  tags           = var.tags
}

# ------------------------------------------------------------------ replication

module "replication" {
  source = "../../modules/replication"

  aws_region         = module.region[var.region_order[0]].aws_region
  image              = var.image
  ecs_cluster_arn    = module.region[var.region_order[0]].ecs_cluster_arn
  subnet_ids         = module.region[var.region_order[0]].private_subnet_ids
  security_group_ids = [module.region[var.region_order[0]].task_security_group_id]
  kms_key_arn        = module.region[var.region_order[0]].kms_key_arn
  regions = [for name in var.region_order : {
    name                = name
    postgres_endpoint   = module.region[name].postgres_endpoint
    postgres_secret_arn = module.region[name].postgres_secret_arn
    redis_endpoint      = module.region[name].redis_endpoint
    grpc_endpoint       = module.region[name].grpc_endpoint
    nats_url            = var.nats_urls[name]
    kms_key_arn         = module.region[name].kms_key_arn
  }]
  tags = var.tags
}
