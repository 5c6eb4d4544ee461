"""The one loop every background worker of a node runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def run_every(stop: asyncio.Event, seconds: Callable[[], float],
                    step: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `step`, then wait `seconds()` or until `stop`; repeat until `stop` is set.

    A failing step is logged and tried again next time: a worker must outlive a database
    restart or a lost peer, never die silently with the node still serving.
    """
    while not stop.is_set():
        try:
            await step()
        except Exception:
            log.exception("%s failed", what)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds())
