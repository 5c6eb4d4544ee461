"""The public REST API v1 of a region node."""
