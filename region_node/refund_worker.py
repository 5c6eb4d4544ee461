"""Delivers and settles cross-region refunds (the moving parts of region_node.refunds).

The push and scan loops are `region_node.saga_worker`'s; this module says what a refund
is to them: a push is addressed by the refund id, the payer's region credits the payer
(`refunds.apply_message`) and the payee's region finishes the refund from the answer
(`refunds.finish`). The scan also parks orphan refund credits (`region_node.suspense`):
payers' refund credits out of our clearing account whose merchant debit was lost in
another region's tail, once listed for reconciliation.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import refunds, suspense, wakeups
from region_node.node import Node
from region_node.refunds import RefundMessage, RefundOutcome
from region_node.saga_worker import SagaWorker

log = logging.getLogger(__name__)


class RefundSaga:
    """The refund saga as `saga_worker.Saga` sees it."""

    name = "refund"
    wake = wakeups.REFUNDS
    push_label = "refund push"
    finish_label = "refund"

    async def message_for(self, conn: AsyncConnection, key: uuid.UUID) -> RefundMessage | None:
        """The message of pending cross-region refund `key`."""
        return await refunds.message_for(conn, key)

    def destination(self, message: RefundMessage) -> str:
        """The payer's home."""
        return message.to_home

    def message_id(self, message: RefundMessage) -> uuid.UUID:
        """The refund's id."""
        return message.id

    async def apply(self, node: Node, message: RefundMessage) -> RefundOutcome:
        """Credit the payer here."""
        return await refunds.apply_message(node.db, region=node.region, message=message)

    async def send(self, node: Node, peer: str, message: RefundMessage) -> RefundOutcome:
        """Push the refund to the payer's region."""
        return await node.peers.apply_refund(peer, message)

    async def finish(self, node: Node, key: uuid.UUID, outcome: RefundOutcome) -> None:
        """Finish refund `key` from the payer region's answer."""
        await refunds.finish(node.db, region=node.region, refund_id=key, outcome=outcome)

    async def inbound(self, conn: AsyncConnection, homes: list[str],
                      limit: int) -> list[RefundMessage]:
        """Pending refunds replicated in for payer homes we serve, without a result."""
        return await refunds.inbound_pending(conn, homes=homes, limit=limit)

    async def settleable(self, conn: AsyncConnection, homes: list[str],
                         limit: int) -> list[tuple[uuid.UUID, RefundOutcome]]:
        """Our pending refunds whose result replicated back."""
        return [(o.refund_id, o) for o in
                await refunds.outbound_settleable(conn, homes=homes, limit=limit)]

    async def park_orphans(self, node: Node, limit: int) -> int:
        """Park the orphan refund credits listed for our clearing accounts (their
        merchant debit was lost in a crashed region's tail); returns how many."""
        me = node.region
        async with node.db.engine.connect() as conn:
            orphans = await suspense.pending_refund_credits(conn, region=me, limit=limit)
        parked = 0
        for credit in orphans:
            async def step(conn: AsyncConnection, credit: suspense.OrphanCredit = credit
                           ) -> bool:
                return await suspense.park_refund_credit(conn, region=me, credit=credit)
            if await node.db.transaction(step):
                parked += 1
                log.warning("parked orphan refund credit %s of payment %s (%d %s) in "
                            "suspense: its merchant debit was lost; listed for "
                            "reconciliation", credit.item_id, credit.payment_id,
                            credit.amount, credit.currency)
        return parked


class RefundWorker(SagaWorker[RefundMessage, RefundOutcome]):
    """Push and scan loops of the refund saga for one region node (its homes are the
    transfer worker's, `saga_worker.served_homes`, so both sagas agree)."""

    def __init__(self, node: Node, batch: int = 100) -> None:
        super().__init__(node, RefundSaga(), batch)
