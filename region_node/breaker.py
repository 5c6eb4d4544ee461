"""A circuit breaker around the channel client (closed, open, half-open).

closed: calls go through; `failure_threshold` consecutive failures (no answer, a
deadline, a 5xx: `ChannelUnavailable`) open it. open: calls are refused at once
(`BreakerOpen`, with the seconds until a trial) for `open_seconds`. half-open: one call at a
time is let through as a trial; `half_open_successes` successes close it, a failure opens
it again. A refusal by the channel (4xx, `ChannelRejected`) is an answer, so it counts as
a success: the channel is up.

State is per node process (each node judges the channel by its own calls); it is shown in
/health/ready, /metrics (`paycluster_channel_breaker_state`: 0 closed, 1 half-open, 2 open)
and `paycluster status`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from channel.client import ChannelRejected, ChannelUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
GAUGE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class BreakerOpen(Exception):
    """The breaker refused the call without trying; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"channel circuit breaker is open; retry in {retry_after:.1f}s")
        self.retry_after = retry_after


class CircuitBreaker:
    """Guards calls to one dependency. Not thread-safe; one event loop per node."""

    def __init__(self, *, failure_threshold: int, open_seconds: float,
                 half_open_successes: int = 1,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str], None] | None = None) -> None:
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.half_open_successes = half_open_successes
        self._clock = clock
        self._on_change = on_change
        self._state = CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._trial_running = False
        self.opened_count = 0

    @property
    def state(self) -> str:
        """The state now (an open breaker whose time is up reads half-open)."""
        if self._state == OPEN and self._clock() - self._opened_at >= self.open_seconds:
            self._set(HALF_OPEN)
        return self._state

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a trial call through (0 unless open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.open_seconds - (self._clock() - self._opened_at))

    def allows(self) -> bool:
        """True if a call would be let through now (no trial is taken by asking)."""
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and not self._trial_running)

    def _set(self, state: str) -> None:
        if state == self._state:
            return
        log.warning("channel breaker %s -> %s", self._state, state)
        self._state = state
        if state == OPEN:
            self._opened_at = self._clock()
            self.opened_count += 1
        self._successes = 0
        if self._on_change is not None:
            self._on_change(state)

    def record_success(self) -> None:
        """A call got an answer."""
        self._failures = 0
        if self._state == HALF_OPEN:
            self._successes += 1
            if self._successes >= self.half_open_successes:
                self._set(CLOSED)

    def record_failure(self) -> None:
        """A call got no usable answer."""
        if self._state == HALF_OPEN:
            self._set(OPEN)
            return
        self._failures += 1
        if self._state == CLOSED and self._failures >= self.failure_threshold:
            self._set(OPEN)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` through the breaker: BreakerOpen without calling it while open (or
        while another trial runs half-open); its ChannelUnavailable counts as a failure,
        anything else it returns or raises (ChannelRejected included) as a success."""
        state = self.state
        if state == OPEN or (state == HALF_OPEN and self._trial_running):
            raise BreakerOpen(max(self.retry_after(), 0.5))
        trial = state == HALF_OPEN
        if trial:
            self._trial_running = True
        try:
            result = await fn()
        except ChannelRejected:
            self.record_success()
            raise
        except ChannelUnavailable:
            self.record_failure()
            raise
        finally:
            if trial:
                self._trial_running = False
        self.record_success()
        return result
