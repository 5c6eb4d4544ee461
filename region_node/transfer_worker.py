"""Delivers and settles cross-region transfers (the moving parts of region_node.transfers).

The push and scan loops are `region_node.saga_worker`'s; this module says what a transfer
is to them: a push is addressed by the payment id, the payee's region applies the message
(`transfers.apply_message`) and the payer's region finishes the payment from the answer
(`transfers.finish`). The scan also parks orphan credits (`region_node.suspense`):
credits out of our clearing account whose debit was lost in another region's tail, once
listed for reconciliation.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import suspense, transfers, wakeups
from region_node.node import Node
from region_node.saga_worker import SagaWorker
from region_node.transfers import TransferMessage, TransferOutcome

log = logging.getLogger(__name__)


class TransferSaga:
    """The transfer saga as `saga_worker.Saga` sees it."""

    name = "transfer"
    wake = wakeups.TRANSFERS
    push_label = "transfer push for payment"
    finish_label = "payment"

    async def message_for(self, conn: AsyncConnection,
                          key: uuid.UUID) -> TransferMessage | None:
        """The transfer message of payment `key`."""
        return await transfers.message_for(conn, key)

    def destination(self, message: TransferMessage) -> str:
        """The payee's home."""
        return message.to_home

    def message_id(self, message: TransferMessage) -> uuid.UUID:
        """The transfer's id."""
        return message.id

    async def apply(self, node: Node, message: TransferMessage) -> TransferOutcome:
        """Credit the payee here."""
        return await transfers.apply_message(node.db, region=node.region, message=message)

    async def send(self, node: Node, peer: str, message: TransferMessage) -> TransferOutcome:
        """Push the message to the payee's region."""
        return await node.peers.apply_transfer(peer, message)

    async def finish(self, node: Node, key: uuid.UUID, outcome: TransferOutcome) -> None:
        """Finish payment `key` from the payee region's answer."""
        await transfers.finish(node.db, region=node.region, payment_id=key, outcome=outcome)

    async def inbound(self, conn: AsyncConnection, homes: list[str],
                      limit: int) -> list[TransferMessage]:
        """Transfer messages replicated in for payee homes we serve, without a result."""
        return await transfers.inbound_pending(conn, homes=homes, limit=limit)

    async def settleable(self, conn: AsyncConnection, homes: list[str],
                         limit: int) -> list[tuple[uuid.UUID, TransferOutcome]]:
        """Our `processing` payments whose result replicated back."""
        return await transfers.outbound_settleable(conn, homes=homes, limit=limit)

    async def park_orphans(self, node: Node, limit: int) -> int:
        """Park the orphan credits listed for our clearing accounts; returns how many."""
        me = node.region
        async with node.db.engine.connect() as conn:
            orphans = await suspense.pending(conn, region=me, limit=limit)
        parked = 0
        for credit in orphans:
            async def step(conn: AsyncConnection, credit: suspense.OrphanCredit = credit
                           ) -> bool:
                return await suspense.park(conn, region=me, credit=credit)
            if await node.db.transaction(step):
                parked += 1
                log.warning("parked orphan credit of payment %s (%d %s) in suspense: its "
                            "debit was lost; listed for reconciliation", credit.payment_id,
                            credit.amount, credit.currency)
        return parked


class TransferWorker(SagaWorker[TransferMessage, TransferOutcome]):
    """Push and scan loops of the transfer saga for one region node."""

    def __init__(self, node: Node, batch: int = 100) -> None:
        super().__init__(node, TransferSaga(), batch)
