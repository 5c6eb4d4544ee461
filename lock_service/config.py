"""Settings of the lock service (env prefix `PAYCLUSTER_LOCK_`)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class LockSettings(BaseSettings):
    """How a process reaches the lock quorum and how long it waits, holds and retries.

    Every process that uses the same locks must use the same `key_prefix` and
    `quarantine_seconds`, and no `ttl` above `quarantine_seconds` (the restart argument in
    `lock_service.quorum` depends on it).
    """

    model_config = SettingsConfigDict(env_prefix="PAYCLUSTER_LOCK_", extra="ignore")

    redis_urls: list[str] = Field(
        default_factory=list,
        description="one Redis per region, as this process reaches it; in the lab the WAN-link "
                    "URLs for the other regions (JSON list in the environment)")
    key_prefix: str = "paycluster:lock"
    ttl_seconds: float = Field(5.0, gt=0, description="default lease length")
    quarantine_seconds: float = Field(
        15.0, gt=0,
        description="a Redis that lost its data grants nothing for this long after we first "
                    "see it again; must be >= every lease ttl in use")
    drift_factor: float = Field(0.01, ge=0, lt=0.5,
                                description="clock-rate drift allowance, fraction of the ttl")
    drift_fixed_seconds: float = Field(0.002, ge=0)
    op_timeout_seconds: float = Field(
        1.0, gt=0, description="bound on one call to one Redis (a cut link costs at most this)")
    acquire_wait_seconds: float = Field(10.0, ge=0,
                                           description="default bound on a whole acquire()")
    max_attempts: int = Field(200, ge=1, description="default bound on acquire attempts")
    retry_base_seconds: float = Field(0.01, gt=0, description="first backoff (jittered)")
    retry_max_seconds: float = Field(0.25, gt=0, description="backoff cap (jittered)")
    renew_fraction: float = Field(1 / 3, gt=0, lt=1,
                                  description="the watchdog renews after this fraction of ttl")

    @model_validator(mode="after")
    def _ttl_fits_quarantine(self) -> LockSettings:
        if self.ttl_seconds > self.quarantine_seconds:
            raise ValueError("ttl_seconds must not exceed quarantine_seconds")
        return self
