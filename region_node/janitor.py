"""Housekeeping: forgets idempotency keys after their 24 h lifetime."""

from __future__ import annotations

import asyncio
import logging

from region_node.node import Node
from region_node.periodic import run_every

log = logging.getLogger(__name__)


class KeyJanitor:
    """Purges expired idempotency keys of the home regions this region serves."""

    def __init__(self, node: Node, interval: float = 60.0) -> None:
        self.node = node
        self.interval = interval

    async def run_once(self) -> int:
        """One purge pass; returns how many keys were forgotten."""
        me = self.node.region
        scopes = [o.home_region for o in self.node.ownership.snapshot()
                  if o.serving_region == me] or [me]
        total = 0
        while (purged := await self.node.idempotency.purge_expired(scopes)) > 0:
            total += purged
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Purge every `interval` seconds until stopped; errors are logged, never fatal."""
        await run_every(stop, lambda: self.interval, self.run_once, "idempotency key purge")
