"""Delivers and settles cross-region transfers (the moving parts of region_node.transfers).

- `push`: right after a cross-region payment commits, send its message to the region
  serving the payee's home over gRPC and settle the payment from the answer.
- `run`: the certainty path. Apply transfer messages that replicated in for homes we
  serve and have no result yet; settle our `processing` payments whose result replicated
  back. Everything it does is idempotent, so it may race the push freely.
- The same scan parks orphan credits (`region_node.suspense`): credits out of our clearing
  account whose debit was lost in another region's tail, once listed for reconciliation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema, suspense, transfers
from region_node.errors import PaymentError
from region_node.node import Node
from region_node.ownership import assert_serving
from region_node.rpc import region_pb2 as pb

log = logging.getLogger(__name__)


class TransferWorker:
    """Push and scan loops for one region node."""

    def __init__(self, node: Node, batch: int = 100) -> None:
        self.node = node
        self.batch = batch
        self._pushes: set[asyncio.Task[None]] = set()

    def served_homes(self) -> list[str]:
        """Home regions this region writes for right now."""
        me = self.node.region
        homes = {o.home_region for o in self.node.ownership.snapshot()
                 if o.serving_region == me}
        if not any(o.home_region == me for o in self.node.ownership.snapshot()):
            homes.add(me)
        return sorted(homes)

    # ------------------------------------------------------------------ payee side

    async def receive(self, message: transfers.TransferMessage) -> transfers.TransferOutcome:
        """Apply one message here (we must serve its payee's home)."""
        async def step(conn: AsyncConnection) -> transfers.TransferOutcome:
            await assert_serving(conn, self.node.region, message.to_home)
            return await transfers.receive(conn, region=self.node.region, message=message)
        return await self.node.db.transaction(step)

    # ------------------------------------------------------------------ payer side

    async def settle(self, payment_id: uuid.UUID, outcome: transfers.TransferOutcome) -> None:
        """Finish our payment from the payee region's answer (no-op if already done)."""
        async def step(conn: AsyncConnection) -> None:
            home = (await conn.execute(sa.select(schema.payments.c.home_region).where(
                schema.payments.c.id == payment_id))).scalar_one_or_none()
            if home is None:
                return
            # Only the payer home's current owner finishes its payments (ownership fence).
            await assert_serving(conn, self.node.region, home)
            await transfers.settle(conn, region=self.node.region, payment_id=payment_id,
                                   outcome=outcome)
        await self.node.db.transaction(step)

    def push_soon(self, payment_id: uuid.UUID) -> None:
        """Start pushing a just-committed transfer without making the client wait for it."""
        task = asyncio.create_task(self.push(payment_id))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    async def push(self, payment_id: uuid.UUID) -> None:
        """Send the payment's transfer message to the region serving the payee's home."""
        async with self.node.db.engine.connect() as conn:
            message = await transfers.message_for(conn, payment_id)
        if message is None:
            return
        owner = (await self.node.ownership.owner(message.to_home)).serving_region
        try:
            if owner == self.node.region:
                outcome = await self.receive(message)
            else:
                result = await self.node.peers.apply_transfer(owner, pb.TransferMessage(
                    id=str(message.id), payment_id=str(message.payment_id),
                    payer_id=str(message.payer_id), payee_id=str(message.payee_id),
                    from_home=message.from_home, to_home=message.to_home,
                    amount=message.amount, currency=message.currency))
                outcome = transfers.TransferOutcome(uuid.UUID(result.transfer_id),
                                                    result.outcome, result.reason or None)
            await self.settle(payment_id, outcome)
        except PaymentError as exc:
            # The replicated message row gets it there later; nothing is lost.
            log.info("transfer push for payment %s deferred: %s", payment_id, exc.message)
        except Exception:
            log.exception("transfer push for payment %s failed", payment_id)

    # ------------------------------------------------------------------ scan loop

    async def run_once(self) -> int:
        """One pass of the certainty path; returns how many messages and payments it moved."""
        homes = self.served_homes()
        async with self.node.db.engine.connect() as conn:
            inbound = await transfers.inbound_pending(conn, homes=homes, limit=self.batch)
            settleable = await transfers.outbound_settleable(conn, homes=homes,
                                                             limit=self.batch)
        done = 0
        for message in inbound:
            try:
                await self.receive(message)
                done += 1
            except PaymentError as exc:
                log.info("transfer %s not applied: %s", message.id, exc.message)
        for payment_id, outcome in settleable:
            try:
                await self.settle(payment_id, outcome)
                done += 1
            except PaymentError as exc:
                log.info("payment %s not settled here: %s", payment_id, exc.message)
        return done + await self.park_orphan_credits()

    async def park_orphan_credits(self) -> int:
        """Park the orphan credits listed for our clearing accounts; returns how many."""
        me = self.node.region
        async with self.node.db.engine.connect() as conn:
            orphans = await suspense.pending(conn, region=me, limit=self.batch)
        parked = 0
        for credit in orphans:
            async def step(conn: AsyncConnection, credit: suspense.OrphanCredit = credit
                           ) -> bool:
                return await suspense.park(conn, region=me, credit=credit)
            if await self.node.db.transaction(step):
                parked += 1
                log.warning("parked orphan credit of payment %s (%d %s) in suspense: its "
                            "debit was lost; listed for reconciliation", credit.payment_id,
                            credit.amount, credit.currency)
        return parked

    async def run(self, stop: asyncio.Event) -> None:
        """Scan until stopped; errors are logged, never fatal."""
        while not stop.is_set():
            moved = 0
            try:
                moved = await self.run_once()
            except Exception:
                log.exception("transfer scan failed")
            if moved < self.batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.node.settings.transfer_poll_seconds)
        for task in list(self._pushes):
            task.cancel()
