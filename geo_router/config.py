"""Settings of one geo router: the one config loader (env prefix `PAYCLUSTER_ROUTER_`).

Maps and lists are JSON in the environment, e.g.
`PAYCLUSTER_ROUTER_CIDR_LOCATIONS='{"10.1.0.0/16": "eu-west", "192.0.2.0/24": "1.3,103.8"}'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RouterSettings(BaseSettings):
    """Everything a router needs; read from `PAYCLUSTER_ROUTER_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="PAYCLUSTER_ROUTER_", extra="ignore")

    # Listeners. The public one proxies the API and answers /v1/resolve; the admin one
    # (drain, weights, state, metrics) is a separate port so it is never exposed with it.
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="public port; 0 = a free one")
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(8081, ge=0, le=65535, description="admin port; 0 = a free one")
    site: str = Field("", description="where this router runs (a label: one per region)")

    # The catalog: a file (an explicit catalog or the lab's cluster.json), or inline.
    catalog_file: Path | None = None
    catalog: list[dict[str, Any]] = Field(default_factory=list)
    region_codes: dict[str, int] | None = Field(
        None, description="region -> id code, if the cluster does not use the defaults")

    # Health probing with hysteresis.
    probe_path: str = "/health/ready"
    probe_interval_seconds: float = Field(1.0, gt=0)
    probe_timeout_seconds: float = Field(0.5, gt=0)
    fall: int = Field(3, ge=1, description="consecutive failures that mark a region down")
    rise: int = Field(2, ge=1, description="consecutive successes that bring it back")

    # Client location and distance.
    default_location: str = Field("us-east", description="a region name or 'lat,lon'")
    cidr_locations: dict[str, str] = Field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="client region -> region -> round trip (ms)")
    trust_forwarded_for: bool = Field(
        False, description="take the client address from X-Forwarded-For (only behind a "
                           "proxy of ours; otherwise a client could claim any address)")
    tie_km: float = Field(50.0, ge=0)
    tie_ms: float = Field(5.0, ge=0)

    # Owner preference.
    prefer_owner: bool = True
    owner_peek_bytes: int = Field(
        16 * 1024, ge=0, description="POST bodies up to this size are read to find the "
                                     "payer / home_region; larger ones stream untouched")
    ownership_refresh_seconds: float = Field(2.0, gt=0)
    # The API key sent when reading `GET /v1/cluster/ownership` (every /v1 call needs one;
    # any principal's key may read it, so give it a non-admin one). Empty: the lab's
    # `router_key` from the catalog file (cluster.json), if it has one.
    api_key: str = Field("", repr=False)

    # Proxying.
    max_attempts: int = Field(3, ge=1, description="regions tried for a safe request")
    retry_buffer_bytes: int = Field(
        64 * 1024, ge=0, description="request body kept to replay a safe request on the "
                                     "next region; a longer body is not retried")
    connect_timeout_seconds: float = Field(1.0, gt=0)
    upstream_timeout_seconds: float = Field(30.0, gt=0)
    max_connections: int = Field(512, ge=1)
    resolve_ttl_seconds: int = Field(10, ge=0)
    graceful_shutdown_seconds: float = Field(10.0, ge=0)

    state_file: Path | None = Field(None, description="shared drain/weight overrides file")
    access_log: bool = False
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _check(self) -> RouterSettings:
        if self.probe_timeout_seconds > self.probe_interval_seconds:
            raise ValueError("probe_timeout_seconds must not exceed probe_interval_seconds "
                             "(a round must end before the next one starts)")
        if self.catalog_file is None and not self.catalog:
            raise ValueError("give catalog_file or catalog")
        return self
