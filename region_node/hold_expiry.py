"""Recovery worker: releases manual-capture holds whose time has run out (TCC cancel)."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import payments
from region_node.node import Node
from region_node.periodic import run_every

log = logging.getLogger(__name__)


class HoldExpiryWorker:
    """Cancels expired holds in small batches; safe to run in several nodes at once
    (rows are claimed with SKIP LOCKED and cancel goes through the TCC barrier)."""

    def __init__(self, node: Node, batch: int = 100) -> None:
        self.node = node
        self.batch = batch

    async def run_once(self) -> int:
        """Release every hold that has expired now; returns how many."""
        async def step(conn: AsyncConnection) -> int:
            ids = await payments.expired_holds(conn, limit=self.batch)
            for payment_id in ids:
                await payments.cancel(conn, region=self.node.region, payment_id=payment_id,
                                      reason="expired")
            return len(ids)

        total = 0
        while True:
            released = await self.node.db.transaction(step)
            total += released
            if released < self.batch:
                break
        if total:
            self.node.metrics.holds_expired.labels(self.node.region).inc(total)
            log.info("released %d expired holds", total)
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set; errors are logged, never fatal."""
        await run_every(stop, lambda: self.node.settings.hold_expiry_poll_seconds,
                        self.run_once, "hold expiry pass")
