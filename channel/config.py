"""Settings of the channel (the acquirer simulator): the one config loader, env prefix
`PAYCLUSTER_CHANNEL_`."""

from __future__ import annotations

import json
import os
import secrets
import string
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_ALPHABET = string.ascii_letters + string.digits
SECRETS_FILE = "secrets.json"
"""Where the channel keeps the keys it generated for itself (mode 0600, in its data dir)."""


def new_secret(prefix: str) -> str:
    """`prefix` and 40 random letters and digits (~238 bits) from `secrets`."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(40))


class ChannelSettings(BaseSettings):
    """Everything the channel needs; read from `PAYCLUSTER_CHANNEL_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="PAYCLUSTER_CHANNEL_", extra="ignore")

    # Two listeners, as a real acquirer separates its merchant API from its operations
    # console: the admin one (faults, statement differences) must stay reachable while the
    # public one is "down" (closed), so they cannot share a socket.
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="merchant API port; 0 = a free one")
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(0, ge=0, le=65535, description="admin API port; 0 = a free one")
    data_dir: Path = Field(Path("channel-data"), description="journal and secrets live here")

    # Credentials. Empty: generated on first start and kept in <data_dir>/secrets.json.
    api_key: str = Field("", description="Bearer key a merchant (our region) calls with")
    admin_key: str = Field("", description="Bearer key of the admin API")
    callback_secret: str = Field("", description="HMAC key of callback signatures")
    token_key: str = Field("", description="HMAC key that turns card numbers into tokens")

    # Behaviour of the simulated networks.
    processing_seconds: float = Field(
        0.05, ge=0, description="time the issuer / bank takes to answer an operation")
    issuer_timeout_seconds: float = Field(
        30.0, ge=0, description="the time-out test card stays pending this long, then fails")
    settlement_days: int = Field(1, ge=0, description="value date = booking date + this")
    card_fee_bps: int = Field(140, ge=0, description="card fee, basis points of the amount")
    card_fee_fixed: int = Field(25, ge=0, description="card fee, fixed minor units")
    payout_fee_fixed: int = Field(20, ge=0, description="payout fee, fixed minor units")

    # Callbacks.
    callback_timeout_seconds: float = Field(5.0, gt=0)
    callback_max_attempts: int = Field(8, ge=1, description="retries when a receiver fails")
    callback_backoff_seconds: float = Field(0.5, gt=0, description="first retry delay")
    callback_backoff_max_seconds: float = Field(30.0, gt=0)

    # Durability of the journal: fsync every record (a crash loses nothing acknowledged).
    fsync: bool = True
    log_level: str = "info"

    def with_secrets(self) -> ChannelSettings:
        """These settings with every empty credential filled from <data_dir>/secrets.json,
        generating (and saving, mode 0600) the ones that file does not have yet."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / SECRETS_FILE
        stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        prefixes = {"api_key": "chk_", "admin_key": "cha_", "callback_secret": "chsec_",
                    "token_key": "chtok_"}
        values: dict[str, str] = {}
        changed = False
        for name, prefix in prefixes.items():
            explicit = getattr(self, name)
            if explicit:
                values[name] = explicit
                continue
            if name not in stored:
                stored[name] = new_secret(prefix)
                changed = True
            values[name] = stored[name]
        if changed:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(stored, fh)
        return self.model_copy(update=values)
