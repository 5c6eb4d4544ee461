"""GSLB-style geo router: sends every client to the nearest healthy region.

Module map (each module has one job):

- `geo`: points on the globe and great-circle distance.
- `catalog`: the regions the router knows (name, location, endpoint, weight), from the
  cluster's config.
- `locate`: where a client is (X-Client-Region, X-Client-Geo, CIDR table, default).
- `health`: probing every region's `/health/ready` with fall/rise hysteresis.
- `owners`: which region owns the data a request names (id -> home region -> owner).
- `overrides`: the operator's drain flags and weights, persisted to a shared file.
- `policy`: the pure routing decision (nearest routable region, weights, owner preference).
- `service`: ties the above together; what the proxy and the APIs ask.
- `proxy`: the HTTP reverse proxy (ASGI), with safe retries on the next region.
- `api`: the DNS-style `GET /v1/resolve` and the admin API (drain, weights, state, metrics).
- `metrics`: Prometheus metrics of the router.
- `errors`: the router's own errors in the cluster's one error shape.
- `config`: `RouterSettings` (env prefix `PAYCLUSTER_ROUTER_`).
- `client`: a small synchronous client of the admin API (CLI, lab, tests).

Region nodes are used only through their public HTTP contracts (`/health/ready`,
`/v1/cluster/ownership`, the v1 API). From `region_node` it imports only pure contracts:
the id -> home region helper of `region_node.regions` (the id format), and the masking of
`region_node.redact` (error bodies, via `errors`, and log lines, via its `RedactFilter`),
so the router masks what it echoes or logs by the nodes' one rule.
"""
