"""Signed webhooks: endpoints, secrets, signing, the delivery worker (issue #7)."""
