"""Prometheus metrics of webhook delivery, on the node's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class WebhookMetrics:
    """Attempts by outcome, and how long an event took from its commit to a 2xx."""

    def __init__(self, region: str, registry: CollectorRegistry) -> None:
        self.region = region
        self.attempts = Counter(
            "paycluster_webhook_attempts_total",
            "Webhook delivery attempts by outcome (delivered, retrying, failed)",
            ["region", "outcome"], registry=registry)
        self.latency = Histogram(
            "paycluster_webhook_delivery_seconds",
            "From the event's commit to the receiver's 2xx, retries included",
            ["region"], registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600, 86400))

    def attempt(self, outcome: str, seconds_since_event: float | None = None) -> None:
        """Count one recorded attempt; a delivered one also feeds the latency histogram."""
        self.attempts.labels(self.region, outcome).inc()
        if seconds_since_event is not None:
            self.latency.labels(self.region).observe(max(seconds_since_event, 0.0))
