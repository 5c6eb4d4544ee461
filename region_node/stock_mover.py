"""Moves global stock between regions when an allotment runs low, and settles orders.

Taking units from another region is a global decision, so it happens under the SKU's
quorum lock (lock_service, one Redis per region, a majority wins); the lock's fencing
token travels with the grant request and the giving region's store refuses a token
older than one it has already seen. The units move as a grant (given by the donor in
its own transaction) and a receipt (taken by us, exactly once); in between they belong
to nobody, so a crash or a cut link can strand units for a while but never sell them
twice. Grants that replicated in without their gRPC answer are received by `run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from lock_service.errors import LockError
from lock_service.quorum import LockService
from region_node import orders, stock, wakeups
from region_node.errors import PaymentError, RegionUnavailable
from region_node.node import Node
from region_node.periodic import run_every

log = logging.getLogger(__name__)


class StockLock(Protocol):
    """A cluster-wide lock that yields a fencing token while held."""

    def hold(self, name: str) -> AbstractAsyncContextManager[int]:
        """Hold the lock `name`; the value is the fencing token of this holding."""


class StockMover:
    """Replenishes this region's allotments and receives grants and settles orders."""

    def __init__(self, node: Node, lock: StockLock) -> None:
        self.node = node
        self.lock = lock

    @contextlib.asynccontextmanager
    async def exclusive(self, sku: str) -> AsyncIterator[int]:
        """Hold the SKU's global lock (strict mode takes it for every reservation)."""
        async with self.lock.hold(f"stock:{sku}") as token:
            yield token

    async def replenish(self, sku: str, needed: int, *, exact: bool = False,
                        token: int | None = None) -> int:
        """Get at least `needed` more units into this region's allotment if other regions
        have them free; returns how many arrived. `exact` asks for no more than needed
        (strict mode); otherwise up to half of a donor's free units, so the next orders
        stay local. Pass `token` when the caller already holds the SKU's lock."""
        if token is None:
            async with self.exclusive(sku) as held:
                return await self._take(sku, needed, exact, held)
        return await self._take(sku, needed, exact, token)

    async def _take(self, sku: str, needed: int, exact: bool, token: int) -> int:
        me = self.node.region
        async with self.node.db.engine.connect() as conn:
            candidates = await stock.donors(conn, sku=sku, me=me)
        gained = 0
        for donor, free in candidates:
            if gained >= needed:
                break
            want = needed - gained if exact else max(needed - gained, math.ceil(free / 2))
            try:
                grant = await self.node.peers.grant_stock(donor, stock.GrantRequest(
                    grant_id=uuid.uuid4(), sku=sku, to_region=me, wanted=want, fence=token))
            except PaymentError as exc:
                log.info("no stock from %s for %s: %s", donor, sku, exc.message)
                continue
            if grant.units <= 0:
                continue
            await self._receive(grant)
            gained += grant.units
        return gained

    async def _receive(self, grant: stock.Grant) -> None:
        async def step(conn: AsyncConnection) -> None:
            await stock.receive_grant(conn, grant=grant, me=self.node.region)
        await self.node.db.transaction(step)

    async def run_once(self) -> int:
        """Receive grants that arrived by replication; settle orders whose payment did."""
        me = self.node.region
        async with self.node.db.engine.connect() as conn:
            pending = await stock.grants_pending(conn, me=me)
        for grant in pending:
            await self._receive(grant)

        async def settle(conn: AsyncConnection) -> int:
            return await orders.settle_open_orders(conn, region=me)
        return len(pending) + await self.node.db.transaction(settle)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until stopped; errors are logged, never fatal."""
        await run_every(stop, lambda: self.node.settings.transfer_poll_seconds, self.run_once,
                        "stock pass", wakeups=self.node.db.wakeups, wake=wakeups.STOCK)


class QuorumStockLock:
    """StockLock over lock_service's quorum locks (one Redis per region)."""

    def __init__(self, service: LockService) -> None:
        self.service = service

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[int]:
        """Hold `name` with lease renewal; a lock that cannot be had (no majority of the
        regions' Redis servers reachable) or is lost is a 503 for the request."""
        try:
            async with self.service.hold(name) as lease:
                yield lease.fence
        except LockError as exc:
            raise RegionUnavailable(f"Stock lock '{name}' unavailable: {exc}",
                                    code="lock_unavailable") from exc
