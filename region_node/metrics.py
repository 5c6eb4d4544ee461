"""Prometheus metrics of a region node (one registry per node, no process globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class NodeMetrics:
    """Request counters and latencies, payments by status, outbox backlog."""

    def __init__(self, region: str) -> None:
        self.region = region
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "paycluster_http_requests_total", "HTTP requests by route and status",
            ["region", "method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "paycluster_http_request_duration_seconds", "HTTP request latency",
            ["region", "method", "route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.payments = Gauge(
            "paycluster_payments", "Payments stored in this region by status",
            ["region", "status"], registry=self.registry)
        self.outbox_backlog = Gauge(
            "paycluster_outbox_backlog", "Outbox events not yet published to the bus",
            ["region"], registry=self.registry)
        self.forwarded = Counter(
            "paycluster_forwarded_requests_total", "Requests forwarded to the owning region",
            ["region", "owner"], registry=self.registry)
        self.holds_expired = Counter(
            "paycluster_holds_expired_total", "Holds released by the expiry worker",
            ["region"], registry=self.registry)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        self.requests.labels(self.region, method, route, str(status)).inc()
        self.latency.labels(self.region, method, route).observe(seconds)

    def render(self) -> bytes:
        """Exposition text."""
        return generate_latest(self.registry)
