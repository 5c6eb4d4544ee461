"""Recovery worker: releases manual-capture holds whose time has run out (TCC cancel)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import payments
from region_node.errors import RegionUnavailable
from region_node.node import Node
from region_node.ownership import assert_serving
from region_node.periodic import run_every

log = logging.getLogger(__name__)


class HoldExpiryWorker:
    """Cancels expired holds in small batches; safe to run in several nodes at once
    (rows are claimed with SKIP LOCKED and cancel goes through the TCC barrier)."""

    def __init__(self, node: Node, batch: int = 100) -> None:
        self.node = node
        self.batch = batch

    async def run_once(self) -> int:
        """Release every hold of the home regions this region serves that has expired
        now; returns how many. Each batch runs behind the ownership fence (a region that
        lost or is handing over a home region no longer releases its holds)."""
        me = self.node.region
        homes = [o.home_region for o in self.node.ownership.snapshot()
                 if o.serving_region == me and not o.banned] or [me]

        def step_for(home: str) -> Callable[[AsyncConnection], Awaitable[int]]:
            async def step(conn: AsyncConnection) -> int:
                await assert_serving(conn, me, home)
                ids = await payments.expired_holds(conn, limit=self.batch, home_region=home)
                for payment_id in ids:
                    await payments.cancel(conn, region=me, payment_id=payment_id,
                                          reason="expired")
                return len(ids)
            return step

        total = 0
        for home in homes:
            while True:
                try:
                    released = await self.node.db.transaction(step_for(home))
                except RegionUnavailable:
                    break  # no longer ours (the cached map was behind): its owner does it
                total += released
                if released < self.batch:
                    break
        if total:
            self.node.metrics.holds_expired.labels(self.node.region).inc(total)
            log.info("released %d expired holds", total)
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set; errors are logged, never fatal. While no hold
        expires the polls back off to 4x `hold_expiry_poll_seconds` (a hold is released
        that much later at worst; expiry is a recovery path, not a deadline)."""
        await run_every(stop, lambda: self.node.settings.hold_expiry_poll_seconds,
                        self.run_once, "hold expiry pass", idle_backoff=True)
