terraform {
  required_version = ">= 1.9"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.0"
    }
    tls = {
      source  = "hashicorp/tls"
      version = ">= 4.0"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.6"
    }
  }
}

# One provider for all three regions: every resource of the modules names its own
# `region` (AWS provider 6). This region only hosts the global parts' API calls.
provider "aws" {
  region = var.home_region

  default_tags {
    tags = var.tags
  }
}
