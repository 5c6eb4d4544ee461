"""Named wake-ups for a node's background workers (one asyncio event per worker).

A worker that has something to look at gets woken instead of finding it on its next
poll: a write path of this node signals after its commit (`Database.transaction` for the
names `mark` put on the connection; the payment hot path after a batch), and the probe
(`region_node.probe`) signals what arrived from outside the process (replicated rows,
another node, rows written by hand). While the probe runs (`probing`), a worker waits for
its wake-up or at most `fallback_seconds`; without it (a worker run on its own, as some
tests do) it polls at its own interval as before. A missed wake-up can only delay work,
never lose it: every worker still looks on its own, only less often.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

OUTBOX = "outbox"
"""The outbox relay: an unpublished outbox row of this region."""
WEBHOOKS = "webhooks"
"""The webhook worker: an event waiting for its fan-out."""
TRANSFERS = "transfers"
"""The transfer worker's scan: a transfer to apply or settle, an orphan credit to park."""
REFUNDS = "refunds"
"""The refund worker's scan: a refund to apply or settle, an orphan credit to park."""
STOCK = "stock"
"""The stock mover: a grant to receive, a reserved order whose payment settled."""

FALLBACK_SECONDS = 3.0
"""How long a woken-up worker waits at most while the probe runs (a missed wake-up)."""

MIN_GAP_SECONDS = 0.05
"""A worker woken again within this long after its last wait waits the rest first: under
load every commit signals, and passes that close together would each find a row or two
(a pass per commit costs more than the 0.2 s poll it replaces). Still 4x sooner than
that poll."""

_INFO_KEY = "paycluster.wake"
_WAKES_OF = {OUTBOX: (OUTBOX, WEBHOOKS)}
"""An outbox row is work for the relay and for the webhook fan-out."""


def mark(conn: Any, *names: str) -> None:
    """Note on `conn` (a SQLAlchemy connection in a `Database.transaction`) that its
    transaction creates work for `names`; they are woken after the commit."""
    conn.info.setdefault(_INFO_KEY, set()).update(names)


def take_marks(conn: Any) -> set[str]:
    """The names `mark`ed on `conn` since the last call (and forget them)."""
    marked: set[str] = conn.info.pop(_INFO_KEY, None) or set()
    return marked


class Wakeups:
    """One node's wake-up events, by worker name."""

    def __init__(self, fallback_seconds: float = FALLBACK_SECONDS,
                 min_gap_seconds: float = MIN_GAP_SECONDS) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._last: dict[str, float] = {}
        self.min_gap_seconds = min_gap_seconds
        self.fallback_seconds = fallback_seconds
        self.probing = False
        """True while the probe runs: workers then rely on wake-ups plus the fallback."""

    def event(self, name: str) -> asyncio.Event:
        """The event that wakes worker `name` (created on first use)."""
        ev = self._events.get(name)
        if ev is None:
            ev = self._events[name] = asyncio.Event()
        return ev

    def signal(self, *names: str) -> None:
        """Wake the workers `names` (an outbox row also wakes the webhook fan-out)."""
        for name in names:
            for target in _WAKES_OF.get(name, (name,)):
                self.event(target).set()

    def timeout(self, interval: float) -> float:
        """How long a worker polling every `interval` waits for its wake-up."""
        return max(interval, self.fallback_seconds) if self.probing else interval

    async def wait(self, name: str, stop: asyncio.Event, interval: float) -> bool:
        """Wait until `name` is signalled, `stop` is set or `timeout(interval)` passed;
        True if woken. The event is cleared: a signal that arrived while the worker was
        busy makes this return at once (the worker looks again)."""
        ev = self.event(name)
        await self.spaced(name)
        if not ev.is_set() and not stop.is_set():
            waiters = [asyncio.ensure_future(ev.wait()), asyncio.ensure_future(stop.wait())]
            try:
                await asyncio.wait(waiters, timeout=self.timeout(interval),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    if not w.done():
                        w.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await w
        woken = ev.is_set()
        ev.clear()
        self._last[name] = time.monotonic()
        return woken

    async def spaced(self, name: str) -> None:
        """Sleep what is left of `min_gap_seconds` since `name`'s last wait ended."""
        left = self._last.get(name, 0.0) + self.min_gap_seconds - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)

    def passed(self, name: str) -> None:
        """Note that worker `name` just ended a wait of its own (see `spaced`)."""
        self._last[name] = time.monotonic()
