"""Cross-region payments as a saga.

Payer's region (A), in the payment's own transaction: debit the payer into A's in-transit
clearing account, record the payment `processing` and a transfer message (`transfers`).

The message reaches the payee's region (B) twice over: a gRPC push right after commit
(speed) and the replicated `transfers` row that B's worker scans (certainty). B applies it
exactly once: the result row (`transfer_results`, keyed by the message id) is B's inbox
and acknowledgement at once. Credited: B's clearing account pays the payee. Rejected
(closed account, wrong currency, no such payee): nothing moves at B.

Back at A (from the push's answer, or from the replicated result row): `credited` ends the
payment `succeeded`; `rejected` refunds the payer out of A's clearing account and ends it
`failed` (compensation). Both paths run the same transition under the payment's row lock,
so whichever comes second finds nothing to do.

Money in transit = the sum of the clearing accounts: +x at A while B has not credited,
then +x at A and -x at B, which cancel out once the payment is complete everywhere.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import ledger, schema
from region_node import payment_states as st
from region_node.db import Database
from region_node.ids import new_id
from region_node.outbox import write_event
from region_node.ownership import assert_serving
from region_node.payment_view import to_api

T = schema.transfers
TR = schema.transfer_results
P = schema.payments

# The transfer worker's polls (every `transfer_poll_seconds`, usually finding nothing):
# prebuilt, no SQLAlchemy compilation or cache-key work per poll. The status is spelled
# out (st.PROCESSING): a partial index's predicate, which a bound parameter would hide.
_INBOUND_PENDING = sa.text("""
    select t.* from transfers t
      left join transfer_results tr on tr.transfer_id = t.id
     where t.to_home = any(cast(:homes as text[])) and tr.transfer_id is null
     order by t.created_at limit :limit
""")
_OUTBOUND_SETTLEABLE = sa.text("""
    select p.id, tr.transfer_id, tr.outcome, tr.reason from payments p
      join transfers t on t.payment_id = p.id
      join transfer_results tr on tr.transfer_id = t.id
     where p.status = 'processing' and p.home_region = any(cast(:homes as text[]))
     limit :limit
""")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferMessage:
    """What the payer's region asks the payee's region to credit."""

    id: uuid.UUID
    payment_id: uuid.UUID
    payer_id: uuid.UUID
    payee_id: uuid.UUID
    from_home: str
    to_home: str
    amount: int
    currency: str

    @classmethod
    def from_row(cls, row: Row[Any]) -> TransferMessage:
        """From a `transfers` row."""
        return cls(row.id, row.payment_id, row.payer_id, row.payee_id, row.from_home,
                   row.to_home, row.amount, row.currency)


@dataclass(frozen=True)
class TransferOutcome:
    """B's answer to a transfer message."""

    transfer_id: uuid.UUID
    outcome: str  # credited | rejected
    reason: str | None = None


async def send(conn: AsyncConnection, *, region: str, message: TransferMessage) -> None:
    """Payer side, inside the payment's transaction: money into transit, message out."""
    clearing = await ledger.system_account(conn, region=region, kind="clearing",
                                           currency=message.currency)
    await ledger.lock_accounts(conn, [clearing])
    await ledger.post(conn, legs=[(message.payer_id, -message.amount),
                                  (clearing, message.amount)],
                      currency=message.currency, entry_type="transfer_out",
                      payment_id=message.payment_id, region=region)
    await conn.execute(T.insert().values(
        id=message.id, payment_id=message.payment_id, payer_id=message.payer_id,
        payee_id=message.payee_id, from_home=message.from_home, to_home=message.to_home,
        amount=message.amount, currency=message.currency))


async def receive(conn: AsyncConnection, *, region: str,
                  message: TransferMessage) -> TransferOutcome:
    """Payee side: credit the payee exactly once, or record why not.

    The caller has checked that this region serves `message.to_home`.
    """
    reason = await _rejection_reason(conn, message)
    journal_id = new_id() if reason is None else None
    # The inbox row first: a concurrent delivery of the same message waits on this key,
    # then finds it taken and answers the recorded result instead of crediting again.
    inserted = (await conn.execute(
        pg_insert(TR).values(transfer_id=message.id, payment_id=message.payment_id,
                             from_home=message.from_home,
                             outcome="rejected" if reason else "credited",
                             reason=reason, journal_id=journal_id)
        .on_conflict_do_nothing().returning(TR.c.transfer_id))).first()
    if inserted is None:
        existing = (await conn.execute(sa.select(TR).where(TR.c.transfer_id == message.id))
                    ).one()
        return TransferOutcome(message.id, existing.outcome, existing.reason)
    if reason is None:
        clearing = await ledger.system_account(conn, region=region, kind="clearing",
                                               currency=message.currency)
        await ledger.lock_accounts(conn, [clearing, message.payee_id])
        await ledger.post(
            conn, legs=[(clearing, -message.amount), (message.payee_id, message.amount)],
            currency=message.currency, entry_type="transfer_in",
            payment_id=message.payment_id, region=region, journal_id=journal_id)
    return TransferOutcome(message.id, "rejected" if reason else "credited", reason)


async def _rejection_reason(conn: AsyncConnection, message: TransferMessage) -> str | None:
    # Locked: the payee cannot be closed between this check and the credit.
    payee = (await conn.execute(sa.select(schema.accounts)
                                .where(schema.accounts.c.id == message.payee_id)
                                .with_for_update())).one_or_none()
    if payee is None:
        return "no_such_payee"
    if payee.status != "open":
        return "account_closed"
    if payee.currency != message.currency:
        return "currency_mismatch"
    if payee.kind not in ledger.USER_KINDS:
        return "invalid_payee"
    return None


async def settle(conn: AsyncConnection, *, region: str, payment_id: uuid.UUID,
                 outcome: TransferOutcome) -> Row[Any] | None:
    """Payer side: finish a `processing` payment from B's result. Idempotent: returns None
    when the payment was already settled (by the other delivery path)."""
    payment = (await conn.execute(sa.select(P).where(P.c.id == payment_id).with_for_update())
               ).one_or_none()
    if payment is None or payment.status != st.PROCESSING:
        return None
    if outcome.outcome == "credited":
        row = (await conn.execute(
            P.update().where(P.c.id == payment_id)
            .values(status=st.SUCCEEDED, updated_at=sa.func.now()).returning(*P.c))).one()
        event = "payment.succeeded"
    else:
        # What went into transit is the transfer's amount: a partial capture sends less
        # than the payment's authorised amount, and only that comes back.
        sent = (await conn.execute(sa.select(T.c.amount)
                                   .where(T.c.id == outcome.transfer_id))).scalar_one()
        clearing = await ledger.system_account(conn, region=region, kind="clearing",
                                               currency=payment.currency)
        await ledger.lock_accounts(conn, [clearing, payment.payer_id])
        await ledger.post(conn, legs=[(clearing, -sent), (payment.payer_id, sent)],
                          currency=payment.currency, entry_type="transfer_reversal",
                          payment_id=payment_id, region=region)
        row = (await conn.execute(
            P.update().where(P.c.id == payment_id)
            .values(status=st.FAILED, amount_captured=0, failure_code=outcome.reason,
                    updated_at=sa.func.now()).returning(*P.c))).one()
        event = "payment.failed"
    await write_event(conn, region=region, event_type=event, aggregate_id=payment_id,
                      payload=to_api(row))
    return row


async def apply_message(db: Database, *, region: str,
                        message: TransferMessage) -> TransferOutcome:
    """Payee side, in its own transaction: apply one message here, fenced by ownership
    (this region must serve the payee's home). What the gRPC server runs for a peer's
    push and the saga worker for its own push and scan."""
    async def step(conn: AsyncConnection) -> TransferOutcome:
        await assert_serving(conn, region, message.to_home)
        return await receive(conn, region=region, message=message)
    return await db.transaction(step)


async def finish(db: Database, *, region: str, payment_id: uuid.UUID,
                 outcome: TransferOutcome) -> None:
    """Payer side, in its own transaction: finish our payment from the payee region's
    answer (no-op if already done or unknown here). Only the payer home's current owner
    finishes its payments (ownership fence)."""
    async def step(conn: AsyncConnection) -> None:
        home = (await conn.execute(sa.select(P.c.home_region).where(P.c.id == payment_id))
                ).scalar_one_or_none()
        if home is None:
            return
        await assert_serving(conn, region, home)
        await settle(conn, region=region, payment_id=payment_id, outcome=outcome)
    await db.transaction(step)


async def inbound_pending(conn: AsyncConnection, *, homes: list[str],
                          limit: int) -> list[TransferMessage]:
    """Transfer messages (replicated in) for homes we serve that have no result yet."""
    rows = (await conn.execute(_INBOUND_PENDING, {"homes": homes, "limit": limit})).all()
    return [TransferMessage.from_row(r) for r in rows]


async def outbound_settleable(conn: AsyncConnection, *, homes: list[str],
                              limit: int) -> list[tuple[uuid.UUID, TransferOutcome]]:
    """Our `processing` payments whose result has replicated back."""
    rows = (await conn.execute(_OUTBOUND_SETTLEABLE, {"homes": homes, "limit": limit})).all()
    return [(r.id, TransferOutcome(r.transfer_id, r.outcome, r.reason)) for r in rows]


async def message_for(conn: AsyncConnection, payment_id: uuid.UUID) -> TransferMessage | None:
    """The transfer message of a cross-region payment."""
    row = (await conn.execute(sa.select(T).where(T.c.payment_id == payment_id))).one_or_none()
    return TransferMessage.from_row(row) if row is not None else None
