"""Settings of a region node's link to the external channel (the acquirer): env prefix
`PAYCLUSTER_CHANNEL_`, the same prefix the channel itself reads, so one environment names
the same merchant key and callback secret on both sides."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ChannelLinkSettings(BaseSettings):
    """How a node reaches the channel, and the timings of its compensation job, circuit
    breaker and statement reconciliation. Production defaults; the lab and the tests
    squeeze them to seconds."""

    model_config = SettingsConfigDict(env_prefix="PAYCLUSTER_CHANNEL_", extra="ignore")

    # Empty url: no channel configured; pay-ins and payouts answer 503 channel_unavailable.
    url: str = ""
    api_key: str = Field("", repr=False)
    callback_secret: str = Field("", repr=False)
    # Where the channel posts this region's callbacks; empty: this node's own API address.
    callback_url: str = ""
    callback_tolerance_seconds: int = Field(300, gt=0, description="signature replay window")
    timeout_seconds: float = Field(5.0, gt=0, description="deadline of one channel call")

    # Compensation (region_node/channel_worker.py): an operation still waiting on the
    # channel `stuck_after_seconds` after it started is queried with the channel's status
    # API, then again after each step of `retry_schedule_seconds`; when the last query
    # still leaves it unsettled it fails (channel_timeout) and is reversed.
    compensation_seconds: float = Field(300.0, gt=0, description="how often the job runs")
    stuck_after_seconds: float = Field(300.0, ge=0)
    retry_schedule_seconds: list[float] = Field(
        default_factory=lambda: [300.0, 900.0, 3600.0, 6 * 3600.0])
    # How often queued payouts are offered to the channel once the breaker lets calls by.
    queue_poll_seconds: float = Field(1.0, gt=0)
    batch: int = Field(100, ge=1)

    # Circuit breaker (region_node/breaker.py).
    breaker_failure_threshold: int = Field(5, ge=1, description="consecutive failures")
    breaker_open_seconds: float = Field(30.0, gt=0, description="open before a trial call")
    breaker_half_open_successes: int = Field(1, ge=1, description="trial calls to close")

    # Daily statement reconciliation (region_node/statement_recon.py): every
    # `statement_seconds` the statement of `statement_lag_days` ago is fetched and matched.
    statement_seconds: float = Field(86400.0, gt=0)
    statement_lag_days: int = Field(1, ge=0)
    run_statement_job: bool = True
