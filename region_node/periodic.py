"""The one loop every background worker of a node runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from region_node.wakeups import Wakeups

log = logging.getLogger(__name__)

IDLE_BACKOFF_MAX = 4.0
"""An idle worker waits up to this many times its interval (see `run_every`)."""


async def run_every(stop: asyncio.Event, seconds: Callable[[], float],
                    step: Callable[[], Awaitable[object]], what: str, *,
                    idle_backoff: bool = False, wakeups: Wakeups | None = None,
                    wake: str = "") -> None:
    """Run `step`, then wait `seconds()` or until `stop`; repeat until `stop` is set.

    A failing step is logged and tried again next time: a worker must outlive a database
    restart or a lost peer, never die silently with the node still serving.

    With `idle_backoff`, a step that reports a count of 0 (it found nothing to do) makes
    the next wait twice as long, up to IDLE_BACKOFF_MAX x `seconds()`; any other result
    (work done, or a step that reports no count) goes back to `seconds()`. An idle
    worker then costs a query every few intervals, and work found again is polled at the
    full rate at once.

    With `wakeups`, the wait also ends when `wake` is signalled, and while the node's
    probe runs it lasts up to `wakeups.fallback_seconds` (the probe and the write paths
    wake the worker when there is work; see region_node.wakeups).
    """
    idle = 1.0
    while not stop.is_set():
        result: object = None
        try:
            result = await step()
        except Exception:
            log.exception("%s failed", what)
        if idle_backoff and isinstance(result, int) and result == 0:
            idle = min(idle * 2, IDLE_BACKOFF_MAX)
        else:
            idle = 1.0
        if wakeups is not None:
            await wakeups.wait(wake, stop, seconds() * idle)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds() * idle)
