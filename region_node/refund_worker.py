"""Delivers and settles cross-region refunds (the moving parts of region_node.refunds).

- `push`: right after a cross-region refund commits (pending), send it to the region
  serving the payer's home over gRPC and settle the refund from the answer.
- `run`: the certainty path. Credit pending refunds that replicated in for payer homes we
  serve and have no result yet; settle our pending refunds whose result replicated back.
  Everything it does is idempotent, so it may race the push freely.
- The same scan parks orphan refund credits (`region_node.suspense`): payers' refund
  credits out of our clearing account whose merchant debit was lost in another region's
  tail, once listed for reconciliation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import refunds, schema, suspense
from region_node.errors import PaymentError
from region_node.node import Node
from region_node.ownership import assert_serving
from region_node.rpc import region_pb2 as pb

log = logging.getLogger(__name__)


class RefundWorker:
    """Push and scan loops of the refund saga for one region node."""

    def __init__(self, node: Node, served_homes: Callable[[], list[str]],
                 batch: int = 100) -> None:
        """`served_homes` names the home regions this region writes for right now (the
        transfer worker's, so both sagas agree)."""
        self.node = node
        self.served_homes = served_homes
        self.batch = batch
        self._pushes: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ payer side

    async def receive(self, message: refunds.RefundMessage) -> refunds.RefundOutcome:
        """Credit one refund's payer here (we must serve the payer's home)."""
        async def step(conn: AsyncConnection) -> refunds.RefundOutcome:
            await assert_serving(conn, self.node.region, message.to_home)
            return await refunds.receive(conn, region=self.node.region, message=message)
        return await self.node.db.transaction(step)

    # ------------------------------------------------------------------ payee side

    async def settle(self, refund_id: uuid.UUID, outcome: refunds.RefundOutcome) -> None:
        """Finish our refund from the payer region's answer (no-op if already done)."""
        async def step(conn: AsyncConnection) -> None:
            home = (await conn.execute(sa.select(schema.refunds.c.home_region).where(
                schema.refunds.c.id == refund_id))).scalar_one_or_none()
            if home is None:
                return
            # Only the payee home's current owner finishes its refunds (ownership fence).
            await assert_serving(conn, self.node.region, home)
            await refunds.settle(conn, region=self.node.region, refund_id=refund_id,
                                 outcome=outcome)
        await self.node.db.transaction(step)

    def push_soon(self, refund_id: uuid.UUID) -> None:
        """Start pushing a just-committed refund without making the client wait for it."""
        task = asyncio.create_task(self.push(refund_id))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    async def push(self, refund_id: uuid.UUID) -> None:
        """Send a pending refund to the region serving the payer's home and settle it."""
        async with self.node.db.engine.connect() as conn:
            message = await refunds.message_for(conn, refund_id)
        if message is None:
            return
        owner = (await self.node.ownership.owner(message.to_home)).serving_region
        try:
            if owner == self.node.region:
                outcome = await self.receive(message)
            else:
                result = await self.node.peers.apply_refund(owner, pb.RefundMessage(
                    id=str(message.id), payment_id=str(message.payment_id),
                    from_home=message.from_home, to_home=message.to_home,
                    amount=message.amount, currency=message.currency))
                outcome = refunds.RefundOutcome(
                    uuid.UUID(result.refund_id), result.outcome, result.reason or None,
                    uuid.UUID(result.payer_id) if result.payer_id else None)
            await self.settle(refund_id, outcome)
        except PaymentError as exc:
            # The replicated refund row gets it there later; nothing is lost.
            log.info("refund push %s deferred: %s", refund_id, exc.message)
        except Exception:
            log.exception("refund push %s failed", refund_id)

    # ------------------------------------------------------------------ scan loop

    async def run_once(self) -> int:
        """One pass of the certainty path; returns how many refunds it moved."""
        homes = self.served_homes()
        async with self.node.db.engine.connect() as conn:
            inbound = await refunds.inbound_pending(conn, homes=homes, limit=self.batch)
            settleable = await refunds.outbound_settleable(conn, homes=homes, limit=self.batch)
        done = 0
        for message in inbound:
            try:
                await self.receive(message)
                done += 1
            except PaymentError as exc:
                log.info("refund %s not applied: %s", message.id, exc.message)
        for outcome in settleable:
            try:
                await self.settle(outcome.refund_id, outcome)
                done += 1
            except PaymentError as exc:
                log.info("refund %s not settled here: %s", outcome.refund_id, exc.message)
        return done + await self.park_orphan_refund_credits()

    async def park_orphan_refund_credits(self) -> int:
        """Park the orphan refund credits listed for our clearing accounts (their
        merchant debit was lost in a crashed region's tail); returns how many."""
        me = self.node.region
        async with self.node.db.engine.connect() as conn:
            orphans = await suspense.pending_refund_credits(conn, region=me, limit=self.batch)
        parked = 0
        for credit in orphans:
            async def step(conn: AsyncConnection, credit: suspense.OrphanCredit = credit
                           ) -> bool:
                return await suspense.park_refund_credit(conn, region=me, credit=credit)
            if await self.node.db.transaction(step):
                parked += 1
                log.warning("parked orphan refund credit %s of payment %s (%d %s) in "
                            "suspense: its merchant debit was lost; listed for "
                            "reconciliation", credit.item_id, credit.payment_id,
                            credit.amount, credit.currency)
        return parked

    async def run(self, stop: asyncio.Event) -> None:
        """Scan until stopped; errors are logged, never fatal."""
        while not stop.is_set():
            moved = 0
            try:
                moved = await self.run_once()
            except Exception:
                log.exception("refund scan failed")
            if moved < self.batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.node.settings.transfer_poll_seconds)
        for task in list(self._pushes):
            task.cancel()
