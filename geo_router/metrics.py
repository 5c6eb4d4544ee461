"""Prometheus metrics of one router (scraped from the admin listener's `/metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from geo_router.policy import State

# Proxy latencies are small next to a payment's; the low buckets show the router's share.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)


class RouterMetrics:
    """Counters, gauges and histograms of requests, decisions, retries and probes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "paycluster_router_requests", "Proxied requests by the region that answered "
            "(\"none\" when no region did) and status code", ["region", "method", "code"],
            registry=r)
        self.request_seconds = Histogram(
            "paycluster_router_request_seconds", "Time from request to response headers, "
            "by answering region", ["region"], buckets=_LATENCY_BUCKETS, registry=r)
        self.decisions = Counter(
            "paycluster_router_decisions", "Routing decisions by chosen region and reason "
            "(owner, nearest, weighted, failover)", ["region", "reason"], registry=r)
        self.attempts = Counter(
            "paycluster_router_upstream_attempts", "Requests sent to a region, by outcome "
            "(response, connect_error, broken_answer, timeout, bad_answer)",
            ["region", "outcome"], registry=r)
        self.failovers = Counter(
            "paycluster_router_failovers", "Safe requests retried on the next region after "
            "a connection failure", ["from_region", "to_region"], registry=r)
        self.not_retried = Counter(
            "paycluster_router_not_retried", "Requests that failed to reach a region and "
            "were not retried (no Idempotency-Key, or body too large to replay)", ["region"],
            registry=r)
        self.no_route = Counter(
            "paycluster_router_no_route", "Requests refused because no region was routable",
            registry=r)
        self.resolves = Counter(
            "paycluster_router_resolves", "GET /v1/resolve answers by region and reason",
            ["region", "reason"], registry=r)
        self.probes = Counter(
            "paycluster_router_probes", "Readiness probes by region and result (ready, "
            "degraded, failed)", ["region", "result"], registry=r)
        self.probe_seconds = Histogram(
            "paycluster_router_probe_seconds", "Readiness probe duration", ["region"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.state_changes = Counter(
            "paycluster_router_state_changes", "Region state changes", ["region",
                                                                         "from_state",
                                                                         "to_state"],
            registry=r)
        self.region_state = Gauge(
            "paycluster_router_region_state", "1 for the region's current state",
            ["region", "state"], registry=r)
        self.region_weight = Gauge(
            "paycluster_router_region_weight", "Effective weight of the region (0-100)",
            ["region"], registry=r)

    def set_state(self, region: str, state: State) -> None:
        """Make `state` the one current state of `region` in the gauge."""
        for s in State:
            self.region_state.labels(region, s.value).set(1 if s == state else 0)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
