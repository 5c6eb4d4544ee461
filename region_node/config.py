"""Settings of one region node: the one config loader (env prefix `PAYCLUSTER_`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from region_node.channel_config import ChannelLinkSettings
from region_node.regions import DEFAULT_REGION_CODES


class RegionSettings(BaseSettings):
    """Everything a region node needs to run; read from `PAYCLUSTER_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="PAYCLUSTER_", extra="ignore")

    region: str = "us-east"
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/paycluster"
    redis_url: str = "redis://127.0.0.1:6379/0"
    nats_url: str = "nats://127.0.0.1:4222"
    api_host: str = "127.0.0.1"
    api_port: int = 8000

    db_pool_size: int = Field(20, ge=1)
    db_max_overflow: int = Field(10, ge=0)
    db_retry_attempts: int = Field(8, ge=1)
    # The payment hot path (region_node/hot_path.py): automatic same-region payments run
    # as one call of the SQL function pay_local, or batched by `hot_path_executors`
    # (each with a connection of its own, up to `hot_path_batch_max` payments a call:
    # group commit) through pay_batch. A payment that waits longer than
    # `hot_path_lock_timeout_ms` for a row lock (a hot account locked elsewhere, or a
    # duplicate request in flight) is rolled back and runs on the two-transaction path.
    hot_path: bool = True
    hot_path_executors: int = Field(2, ge=1)
    hot_path_batch_max: int = Field(64, ge=1)
    hot_path_lock_timeout_ms: int = Field(1000, ge=1)

    max_amount: int = Field(100_000_000_00, gt=0, description="largest amount in minor units")
    max_body_bytes: int = Field(64 * 1024, gt=0)
    hold_ttl_seconds: float = Field(7 * 24 * 3600, gt=0, description="how long a hold lives")
    idempotency_ttl_seconds: float = Field(24 * 3600, gt=0)
    # After this long an unfinished key counts as abandoned and a retry may take it over.
    idempotency_lock_seconds: float = Field(60, gt=0)

    outbox_poll_seconds: float = Field(0.2, gt=0)
    outbox_batch: int = Field(200, ge=1)
    hold_expiry_poll_seconds: float = Field(1.0, gt=0)
    # Webhooks (region_node/webhooks/): retries back off from `webhook_retry_base_seconds`
    # (doubling, capped at the max interval, with jitter) until the event is
    # `webhook_max_age_seconds` old, then the delivery is marked failed.
    webhook_poll_seconds: float = Field(0.1, gt=0)
    webhook_batch: int = Field(200, ge=1)
    webhook_concurrency: int = Field(32, ge=1)
    webhook_endpoint_concurrency: int = Field(8, ge=1, description="in flight per endpoint")
    webhook_timeout_seconds: float = Field(5.0, gt=0)
    webhook_retry_base_seconds: float = Field(30.0, gt=0)
    webhook_retry_max_interval_seconds: float = Field(3600.0, gt=0)
    webhook_max_age_seconds: float = Field(86400.0, gt=0)
    # The delivery log (deliveries and attempts) is kept this long, then purged by the
    # region that wrote it.
    webhook_log_retention_seconds: float = Field(30 * 86400.0, gt=0)
    events_stream: str = "PAYCLUSTER_EVENTS"
    events_subject_prefix: str = "paycluster.events"
    run_workers: bool = True
    log_level: str = "INFO"

    # Multi-region. `peers` maps every other region to the gRPC address that reaches it
    # from here (in the local lab: the WAN-link port, never the peer's own port).
    grpc_port: int = Field(0, ge=0, description="0 = no gRPC server")
    peers: dict[str, str] = Field(default_factory=dict)
    region_codes: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_REGION_CODES))
    grpc_deadline_seconds: float = Field(5.0, gt=0)
    # Mutual TLS between regions (see region_node/rpc/tls.py): PEM files of the cluster CA,
    # this region's certificate and key; all three or none. A node with a gRPC server or
    # peers refuses to start without them: the owner of an account trusts the principal a
    # forwarded request carries because the link is mutual TLS (`paycluster up` always
    # sets them). `tls_peer_names` maps a peer region to the name its certificate must
    # carry (default `<region>.paycluster.internal`).
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_peer_names: dict[str, str] = Field(default_factory=dict)
    # Test-only escape hatch: plaintext gRPC, allowed only when the server binds and every
    # peer is dialled on 127.0.0.1; logged as a warning at every start. Never in a
    # deployment (PAYCLUSTER_GRPC_INSECURE_LOOPBACK_ONLY).
    grpc_insecure_loopback_only: bool = False
    ownership_refresh_seconds: float = Field(0.5, gt=0)
    transfer_poll_seconds: float = Field(0.2, gt=0)
    # Pushes of a saga's messages (transfers, refunds; per worker) running at once; beyond
    # it a push is not started and the scan delivers the message, one poll later.
    saga_max_pushes_in_flight: int = Field(500, ge=1)
    replication_slo_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(1.0, gt=0)

    # Global stock. One Redis per region for the quorum lock, as reached from here (in
    # the lab: the own Redis directly, the others through WAN links). Empty: own Redis.
    lock_redis_urls: dict[str, str] = Field(default_factory=dict)
    lock_ttl_seconds: float = Field(5.0, gt=0)

    # Ownership leases (region_node.leases): the serving region of a home region holds
    # the quorum lock ownership:<home>; writes stop `margin` before it would end, so a
    # region cut off from the majority stops writing before anyone can take over.
    ownership_lease_ttl_seconds: float = Field(3.0, gt=0, le=15.0)
    ownership_lease_renew_seconds: float = Field(1.0, gt=0)
    ownership_lease_margin_seconds: float = Field(1.0, gt=0)
    ownership_lease_op_timeout_seconds: float = Field(0.5, gt=0)

    # How long a node trusts an authenticated API key without asking its store again: the
    # bound on how late a revocation bites on other nodes (plus replication lag elsewhere).
    auth_cache_seconds: float = Field(5.0, ge=0)

    # Rate limits per API key (token bucket in this region's Redis, shared by its nodes).
    # Defaults for principals without limits of their own: high enough that a busy
    # merchant (the benchmark: ~200 payments/s on one key) is never throttled.
    rate_limit_per_second: float = Field(1000.0, gt=0)
    rate_limit_burst: int = Field(2000, ge=1)
    # While Redis is unreachable each node limits on its own; it probes Redis again after
    # this many seconds.
    rate_limit_fallback_seconds: float = Field(5.0, gt=0)

    # The external channel (acquirer): its own settings class, env `PAYCLUSTER_CHANNEL_*`.
    channel: ChannelLinkSettings = Field(default_factory=ChannelLinkSettings)
