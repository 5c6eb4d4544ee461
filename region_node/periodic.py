"""The one loop every background worker of a node runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

IDLE_BACKOFF_MAX = 4.0
"""An idle worker waits up to this many times its interval (see `run_every`)."""


async def run_every(stop: asyncio.Event, seconds: Callable[[], float],
                    step: Callable[[], Awaitable[object]], what: str, *,
                    idle_backoff: bool = False) -> None:
    """Run `step`, then wait `seconds()` or until `stop`; repeat until `stop` is set.

    A failing step is logged and tried again next time: a worker must outlive a database
    restart or a lost peer, never die silently with the node still serving.

    With `idle_backoff`, a step that reports a count of 0 (it found nothing to do) makes
    the next wait twice as long, up to IDLE_BACKOFF_MAX x `seconds()`; any other result
    (work done, or a step that reports no count) goes back to `seconds()`. An idle
    worker then costs a query every few intervals, and work found again is polled at the
    full rate at once.
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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds() * idle)
