"""Fault injection, deterministic with a seed.

Every decision is a pure function of (seed, fault, key): `roll` hashes them into a number in
[0, 1) and the fault fires when it is below the configured probability. Keys name what the
decision is about, never when it happens:

- a callback: `<reference>|<event type>|<version>`, so the same workload meets the same
  drops, duplicates, delays and reorders whatever the scheduling of the server;
- an API call: `<operation>|<reference>|<n>` with n counting the calls for that reference,
  so a retry gets a fresh decision, the same one in every run.

So two runs with the same seed and the same requests see exactly the same faults (a test
checks this across two server processes), and the log of decisions says which fired.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, deque
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

Probability = Field(0.0, ge=0.0, le=1.0)
FIRED_LOG_MAX = 100_000
"""The most recent fault decisions kept for `GET /admin/faults`."""


class FaultConfig(BaseModel):
    """The faults in force; probabilities in [0, 1], all zero by default."""

    seed: int = 0
    callback_drop: float = Probability
    callback_duplicate: float = Probability
    callback_delay: float = Probability
    callback_delay_seconds: float = Field(2.0, ge=0)
    callback_reorder: float = Probability
    # A reordered callback waits for the next one to the same URL, at most this long.
    callback_reorder_max_seconds: float = Field(2.0, ge=0)
    # 500 before the request does anything (a retry is safe)...
    error_rate: float = Probability
    # ...or 500 after it took effect (the caller cannot tell: it must query the status).
    error_after_rate: float = Probability
    hang_rate: float = Probability
    hang_seconds: float = Field(10.0, ge=0)


class DownMode(StrEnum):
    """How the merchant API is down."""

    REFUSE = "refuse"  # the listener is closed: connections are refused
    RESET = "reset"  # connections are accepted, then reset before any answer
    UNAVAILABLE = "503"  # it accepts connections and answers 503 with Retry-After


def roll(seed: int, fault: str, key: str) -> float:
    """A number in [0, 1) fixed by (seed, fault, key): the dice of every fault decision."""
    digest = hashlib.sha256(f"{seed}|{fault}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Faults:
    """The fault configuration in force, the call counters and the log of what fired."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self.config = config or FaultConfig()
        self._calls: Counter[str] = Counter()
        # Bounded: a lab channel may run for days; tests read far fewer entries.
        self.fired: deque[dict[str, Any]] = deque(maxlen=FIRED_LOG_MAX)
        self.down_until = 0.0  # time.monotonic() at which the outage ends
        self.down_mode = DownMode.UNAVAILABLE

    def configure(self, config: FaultConfig) -> None:
        """Put `config` in force and start counting and logging afresh."""
        self.config = config
        self._calls.clear()
        self.fired.clear()

    def decide(self, fault: str, key: str) -> bool:
        """Whether `fault` (a FaultConfig probability field) fires for `key`; logged if so."""
        probability = float(getattr(self.config, fault))
        hit = probability > 0 and roll(self.config.seed, fault, key) < probability
        if hit:
            self.fired.append({"fault": fault, "key": key})
        return hit

    def call_key(self, operation: str, reference: str) -> str:
        """The key of this API call: the operation, the reference and its call count."""
        base = f"{operation}|{reference}"
        self._calls[base] += 1
        return f"{base}|{self._calls[base]}"

    # ----------------------------------------------------------------- outages

    def go_down(self, seconds: float, mode: DownMode) -> None:
        """Be down for `seconds` from now."""
        self.down_mode = mode
        self.down_until = time.monotonic() + seconds

    def come_up(self) -> None:
        """End an outage now."""
        self.down_until = 0.0

    @property
    def down_remaining(self) -> float:
        """Seconds of outage left (0 when up)."""
        return max(0.0, self.down_until - time.monotonic())
