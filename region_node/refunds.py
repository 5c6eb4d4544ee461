"""Refunds, within a region and across regions (a saga in the payment's reverse direction).

Every refund is executed by the region serving the payee's home: the merchant refunds out
of its own account, which only that region writes. Refund ids are stamped with that home,
and only that region inserts and updates `refunds` rows (one writer per row).

Same home region (payer and payee): one transaction debits the payee, credits the payer,
records the refund `succeeded` and raises the payment's `amount_refunded`; that region
also writes the payment row.

Across regions, the payee's region (B) debits the payee into its in-transit clearing
account and records the refund `pending` in one transaction; the refund row is also the
transfer message. It reaches the region serving the payer's home (A) twice over: a gRPC
push right after commit (speed) and the replicated row that A's worker scans (certainty).
A applies it exactly once: the result row (`refund_results`, keyed by the refund id,
written only by A) is its inbox and acknowledgement. Credited: A's clearing account pays
the payer and A, the payment row's writer, raises the payment's `amount_refunded`.
Rejected (payer closed, payment unknown there...): nothing moves at A. Back at B (from the
push's answer or the replicated result): `credited` ends the refund `succeeded`;
`rejected` re-credits the payee out of B's clearing account and ends it `failed` with the
reason. Both paths run under the refund's row lock, so the second finds nothing to do.

What may still be refunded is decided at B from B's own rows only: what B credited to the
payee for the payment (its `transfer_results` inbox and that credit's journal), minus the
refunds B recorded that are pending or succeeded. Concurrent refunds of a payment are
serialized on the payee account's row lock, which every refund takes before counting.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import access, ledger, schema
from region_node import payment_states as st
from region_node.db import Database
from region_node.errors import Conflict, InvalidRequest, NotFound, RegionUnavailable
from region_node.ids import new_id
from region_node.outbox import write_event
from region_node.ownership import assert_serving
from region_node.payment_view import to_api as payment_to_api
from region_node.principals import Principal

R = schema.refunds
RR = schema.refund_results
P = schema.payments
T = schema.transfers
TR = schema.transfer_results
J = schema.journal_entries
A = schema.accounts

PENDING = "pending"
SUCCEEDED = "succeeded"
FAILED = "failed"

CREDITED = "credited"
REJECTED = "rejected"

# The refund worker's polls (every `transfer_poll_seconds`, usually finding nothing):
# prebuilt, no SQLAlchemy compilation or cache-key work per poll. The status is spelled
# out (PENDING): the predicate of the partial index ix_refunds_pending.
_INBOUND_PENDING = sa.text("""
    select r.* from refunds r
      left join refund_results rr on rr.refund_id = r.id
     where r.status = 'pending' and r.payer_home = any(cast(:homes as text[]))
       and r.payer_home <> r.home_region and rr.refund_id is null
     order by r.created_at limit :limit
""")
_OUTBOUND_SETTLEABLE = sa.text("""
    select rr.* from refund_results rr join refunds r on r.id = rr.refund_id
     where r.status = 'pending' and r.home_region = any(cast(:homes as text[]))
     order by r.created_at limit :limit
""")


@dataclass(frozen=True)
class RefundMessage:
    """What the payee's region asks the payer's region to credit."""

    id: uuid.UUID
    payment_id: uuid.UUID
    from_home: str  # the payee's home: its region debited the payee
    to_home: str    # the payer's home: its region credits the payer
    amount: int
    currency: str

    @classmethod
    def from_row(cls, row: Row[Any]) -> RefundMessage:
        """From a cross-region `refunds` row."""
        return cls(row.id, row.payment_id, row.home_region, row.payer_home, row.amount,
                   row.currency)


@dataclass(frozen=True)
class RefundOutcome:
    """The payer region's answer to a refund."""

    refund_id: uuid.UUID
    outcome: str  # credited | rejected
    reason: str | None = None
    payer_id: uuid.UUID | None = None


def to_api(row: Row[Any] | dict[str, Any]) -> dict[str, Any]:
    """The public JSON shape of a refund (also the payload of its events: `payer` and
    `payee` let webhooks find the parties' endpoints)."""
    m = row._mapping if isinstance(row, Row) else row
    return {
        "id": str(m["id"]), "object": "refund", "payment_id": str(m["payment_id"]),
        "amount": m["amount"], "currency": m["currency"], "status": m["status"],
        "reason": m["reason"],
        "payer": str(m["payer_id"]) if m["payer_id"] else None,
        "payee": str(m["payee_id"]) if m["payee_id"] else None,
        "home_region": m["home_region"],
        "created_at": m["created_at"].isoformat(), "updated_at": m["updated_at"].isoformat(),
    }


async def _event(conn: AsyncConnection, region: str, row: Row[Any]) -> None:
    await write_event(conn, region=region, event_type=f"refund.{row.status}",
                      aggregate_id=row.id, payload=to_api(row))


# --------------------------------------------------------------------------- lookups

@dataclass(frozen=True)
class Credit:
    """What the payee's region credited to the payee for a cross-region payment."""

    payment_id: uuid.UUID
    payee_id: uuid.UUID
    payee_home: str
    payer_home: str
    amount: int
    currency: str


# The payee's leg of the credit (the positive one; the clearing account's is negative).
_CREDIT_OF = (
    sa.select(TR.c.payment_id, TR.c.from_home, J.c.account_id, J.c.amount, J.c.currency,
              A.c.home_region)
    .select_from(TR.join(J, J.c.journal_id == TR.c.journal_id)
                 .join(A, A.c.id == J.c.account_id))
    .where(TR.c.outcome == "credited", J.c.amount > 0, A.c.kind.in_(ledger.USER_KINDS)))


async def credit_of(conn: AsyncConnection, payment_id: uuid.UUID) -> Credit | None:
    """This region's credit of a cross-region payment's payee (None: not credited here)."""
    row = (await conn.execute(_CREDIT_OF.where(TR.c.payment_id == payment_id))).first()
    if row is None:
        return None
    return Credit(row.payment_id, row.account_id, row.home_region, row.from_home,
                  int(row.amount), str(row.currency))


async def payee_home_of(conn: AsyncConnection, payment_id: uuid.UUID) -> str | None:
    """The payee's home region of a payment, from this region's rows: the payment (or its
    replica), else our own credit of it. None if neither is here."""
    row = (await conn.execute(sa.select(P.c.home_region, P.c.payee_home)
                              .where(P.c.id == payment_id))).first()
    if row is not None:
        return str(row.payee_home or row.home_region)
    credit = await credit_of(conn, payment_id)
    return credit.payee_home if credit is not None else None


async def _payer_of(conn: AsyncConnection, payment_id: uuid.UUID) -> uuid.UUID | None:
    """The payer of a payment if this region has its replica or its transfer message."""
    found = (await conn.execute(sa.select(P.c.payer_id).where(P.c.id == payment_id))
             ).scalar_one_or_none()
    if found is None:
        found = (await conn.execute(sa.select(T.c.payer_id).where(T.c.payment_id == payment_id)
                                    .limit(1))).scalar_one_or_none()
    return found


async def _committed(conn: AsyncConnection, payment_id: uuid.UUID) -> int:
    """What refunds of the payment already take: pending ones count, failed ones not."""
    return int((await conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(R.c.amount), 0))
        .where(R.c.payment_id == payment_id, R.c.status.in_((PENDING, SUCCEEDED))))
    ).scalar_one())


def _amount(captured: int, committed: int, amount: int | None) -> int:
    """The amount to refund now: `amount`, or all that is left; never beyond what was
    captured minus what other refunds take."""
    refundable = captured - committed
    if refundable <= 0:
        raise Conflict("This payment has been fully refunded", code="charge_already_refunded")
    to_refund = refundable if amount is None else amount
    if to_refund > refundable:
        raise InvalidRequest(f"Cannot refund {to_refund}: only {refundable} is refundable",
                             code="amount_too_large", param="amount")
    return to_refund


# --------------------------------------------------------------------------- payee side

async def create(conn: AsyncConnection, *, region: str, refund_id: uuid.UUID,
                 payment_id: uuid.UUID, amount: int | None, principal: Principal,
                 serving_home: str, payer_home: str | None = None) -> Row[Any]:
    """Refund `amount` (default: all that is left) of a payment, at the region serving the
    payee's home (`serving_home`, fenced by the caller's transaction). Only the payee's
    principal (or an admin) may. Same home: done at once (`succeeded`). Across regions:
    the payee is debited into transit and the refund is `pending` (push it after commit).
    `payer_home` is the home stamped in the payment id, if the cluster knows it.
    """
    payment = (await conn.execute(sa.select(P).where(P.c.id == payment_id))).one_or_none()
    if payment is not None and (payment.payee_home or payment.home_region) == payment.home_region:
        _served(payment.home_region, serving_home)
        return await _same_region(conn, region=region, refund_id=refund_id,
                                  payment_id=payment_id, amount=amount, principal=principal)
    credit = await credit_of(conn, payment_id)
    if credit is None:
        if payment is not None:
            raise Conflict(f"Cannot refund a payment whose status is '{payment.status}'",
                           code="payment_unexpected_state")
        if payer_home is None or payer_home == serving_home:
            # We would hold the payment (we serve its home): it does not exist.
            raise NotFound(f"No such payment: '{payment_id}'")
        # Routed here by a region that has the payment (api/refunds.py): it exists in its
        # payer's home, and has not been credited to the payee here (yet).
        raise Conflict("The payment has not been credited to its payee yet",
                       code="payment_unexpected_state")
    _served(credit.payee_home, serving_home)
    return await _start_cross_region(conn, region=region, refund_id=refund_id, credit=credit,
                                     amount=amount, principal=principal)


def _served(payee_home: str, serving_home: str) -> None:
    # The request was routed (and fenced) for another home than the data says: answered
    # as a retryable 503 instead of writing rows this region may not write.
    if payee_home != serving_home:
        raise RegionUnavailable(f"This refund belongs to home region {payee_home}; retry",
                                code="misrouted")


async def _same_region(conn: AsyncConnection, *, region: str, refund_id: uuid.UUID,
                       payment_id: uuid.UUID, amount: int | None,
                       principal: Principal) -> Row[Any]:
    """Payer and payee in one home region: one transaction, as before the saga existed."""
    await access.require_payment(conn, principal, payment_id, (access.PAYEE,))
    payment = (await conn.execute(sa.select(P).where(P.c.id == payment_id).with_for_update())
               ).one()
    if payment.status != st.SUCCEEDED:
        raise Conflict(f"Cannot refund a payment whose status is '{payment.status}'",
                       code="payment_unexpected_state")
    to_refund = _amount(payment.amount_captured,
                        max(payment.amount_refunded, await _committed(conn, payment_id)),
                        amount)
    accounts = await ledger.lock_accounts(conn, [payment.payer_id, payment.payee_id])
    ledger.require_open(accounts[payment.payer_id], param="payer")
    ledger.require_spendable(accounts[payment.payee_id], to_refund, param="payee")
    journal_id = await ledger.post(
        conn, legs=[(payment.payee_id, -to_refund), (payment.payer_id, to_refund)],
        currency=payment.currency, entry_type="refund", payment_id=payment.id, region=region)
    row = (await conn.execute(R.insert().values(
        id=refund_id, payment_id=payment.id, amount=to_refund, currency=payment.currency,
        status=SUCCEEDED, payee_id=payment.payee_id, payer_id=payment.payer_id,
        home_region=payment.home_region, payer_home=payment.home_region,
        journal_id=journal_id).returning(*R.c))).one()
    updated = (await conn.execute(
        P.update().where(P.c.id == payment.id)
        .values(amount_refunded=P.c.amount_refunded + to_refund, updated_at=sa.func.now())
        .returning(*P.c))).one()
    await write_event(conn, region=region, event_type="payment.refunded",
                      aggregate_id=payment.id, payload=payment_to_api(updated))
    await _event(conn, region, row)
    return row


async def _start_cross_region(conn: AsyncConnection, *, region: str, refund_id: uuid.UUID,
                              credit: Credit, amount: int | None,
                              principal: Principal) -> Row[Any]:
    """Payee side of the saga: the payee's money into transit, the refund `pending`."""
    await access.require_account(conn, principal, credit.payee_id, "payment")
    # The payee's row lock serializes every refund of this payment (and the payee's other
    # spending) before the refunds already taken are counted: no two refunds can both see
    # the same room left. Read committed: the count below sees what the lock waited for.
    payee = (await ledger.lock_accounts(conn, [credit.payee_id], params=["payee"])
             )[credit.payee_id]
    to_refund = _amount(credit.amount, await _committed(conn, credit.payment_id), amount)
    ledger.require_spendable(payee, to_refund, param="payee")
    clearing = await ledger.system_account(conn, region=region, kind="clearing",
                                           currency=credit.currency)
    await ledger.lock_accounts(conn, [clearing])
    journal_id = await ledger.post(
        conn, legs=[(credit.payee_id, -to_refund), (clearing, to_refund)],
        currency=credit.currency, entry_type="refund_out", payment_id=credit.payment_id,
        region=region)
    return (await conn.execute(R.insert().values(
        id=refund_id, payment_id=credit.payment_id, amount=to_refund, currency=credit.currency,
        status=PENDING, payee_id=credit.payee_id,
        payer_id=await _payer_of(conn, credit.payment_id), home_region=credit.payee_home,
        payer_home=credit.payer_home, journal_id=journal_id).returning(*R.c))).one()


async def settle(conn: AsyncConnection, *, region: str, refund_id: uuid.UUID,
                 outcome: RefundOutcome) -> Row[Any] | None:
    """Payee side: finish a `pending` refund from the payer region's answer. Idempotent:
    None when the refund was already settled (by the other delivery path)."""
    refund = (await conn.execute(sa.select(R).where(R.c.id == refund_id).with_for_update())
              ).one_or_none()
    if refund is None or refund.status != PENDING:
        return None
    if outcome.outcome == CREDITED:
        values: dict[str, Any] = {"status": SUCCEEDED}
    else:
        # Compensation: the merchant gets back what went into transit. Its account cannot
        # have closed meanwhile (ledger.close_account waits for pending refunds).
        clearing = await ledger.system_account(conn, region=region, kind="clearing",
                                               currency=refund.currency)
        await ledger.lock_accounts(conn, [refund.payee_id, clearing])
        await ledger.post(conn, legs=[(clearing, -refund.amount), (refund.payee_id, refund.amount)],
                          currency=refund.currency, entry_type="refund_reversal",
                          payment_id=refund.payment_id, region=region)
        values = {"status": FAILED, "reason": outcome.reason or "rejected"}
    row = (await conn.execute(
        R.update().where(R.c.id == refund_id)
        .values(**values, payer_id=sa.func.coalesce(R.c.payer_id, outcome.payer_id),
                updated_at=sa.func.now()).returning(*R.c))).one()
    await _event(conn, region, row)
    return row


# --------------------------------------------------------------------------- payer side

async def receive(conn: AsyncConnection, *, region: str,
                  message: RefundMessage) -> RefundOutcome:
    """Payer side: credit the payer exactly once, or record why not. The caller has
    checked that this region serves `message.to_home` (so it writes the payment row)."""
    # The payment's row lock orders concurrent deliveries of this refund (and other
    # refunds of the payment): the second waits, then finds the inbox row taken.
    payment = (await conn.execute(sa.select(P).where(P.c.id == message.payment_id)
                                  .with_for_update())).one_or_none()
    reason = await _rejection_reason(conn, payment, message)
    journal_id = new_id() if reason is None else None
    payer_id = payment.payer_id if payment is not None else None
    inserted = (await conn.execute(
        pg_insert(RR).values(refund_id=message.id, payment_id=message.payment_id,
                             from_home=message.from_home,
                             outcome=REJECTED if reason else CREDITED, reason=reason,
                             payer_id=payer_id, journal_id=journal_id)
        .on_conflict_do_nothing().returning(RR.c.refund_id))).first()
    if inserted is None:
        existing = (await conn.execute(sa.select(RR).where(RR.c.refund_id == message.id))).one()
        return RefundOutcome(message.id, existing.outcome, existing.reason, existing.payer_id)
    if reason is None and payment is not None:
        clearing = await ledger.system_account(conn, region=region, kind="clearing",
                                               currency=message.currency)
        await ledger.lock_accounts(conn, [payment.payer_id, clearing])
        await ledger.post(conn, legs=[(clearing, -message.amount),
                                      (payment.payer_id, message.amount)],
                          currency=message.currency, entry_type="refund_in",
                          payment_id=message.payment_id, region=region, journal_id=journal_id)
        updated = (await conn.execute(
            P.update().where(P.c.id == payment.id)
            .values(amount_refunded=P.c.amount_refunded + message.amount,
                    updated_at=sa.func.now()).returning(*P.c))).one()
        await write_event(conn, region=region, event_type="payment.refunded",
                          aggregate_id=payment.id, payload=payment_to_api(updated))
    return RefundOutcome(message.id, REJECTED if reason else CREDITED, reason, payer_id)


async def _rejection_reason(conn: AsyncConnection, payment: Row[Any] | None,
                            message: RefundMessage) -> str | None:
    if payment is None:
        # E.g. the payment was lost in a crashed region's tail (listed for reconciliation).
        return "no_such_payment"
    # Locked: the payer cannot close between this check and the credit.
    payer = (await conn.execute(sa.select(A).where(A.c.id == payment.payer_id)
                                .with_for_update())).one_or_none()
    if payer is None:
        return "no_such_payer"
    if payer.status != "open":
        return "account_closed"
    if payer.currency != message.currency or payment.currency != message.currency:
        return "currency_mismatch"
    if payment.amount_refunded + message.amount > payment.amount_captured:
        # Never expected (the payee's region counts every refund it started), but the
        # payment row's own limit must hold whatever arrives.
        return "exceeds_captured"
    return None


# --------------------------------------------------------------------------- scans

async def apply_message(db: Database, *, region: str,
                        message: RefundMessage) -> RefundOutcome:
    """Payer side, in its own transaction: credit one refund's payer here, fenced by
    ownership (this region must serve the payer's home). What the gRPC server runs for a
    peer's push and the saga worker for its own push and scan."""
    async def step(conn: AsyncConnection) -> RefundOutcome:
        await assert_serving(conn, region, message.to_home)
        return await receive(conn, region=region, message=message)
    return await db.transaction(step)


async def finish(db: Database, *, region: str, refund_id: uuid.UUID,
                 outcome: RefundOutcome) -> None:
    """Payee side, in its own transaction: finish our refund from the payer region's
    answer (no-op if already done or unknown here). Only the payee home's current owner
    finishes its refunds (ownership fence)."""
    async def step(conn: AsyncConnection) -> None:
        home = (await conn.execute(sa.select(R.c.home_region).where(R.c.id == refund_id))
                ).scalar_one_or_none()
        if home is None:
            return
        await assert_serving(conn, region, home)
        await settle(conn, region=region, refund_id=refund_id, outcome=outcome)
    await db.transaction(step)


async def inbound_pending(conn: AsyncConnection, *, homes: list[str],
                          limit: int) -> list[RefundMessage]:
    """Pending cross-region refunds (replicated in) to payers of homes we serve that have
    no result yet."""
    rows = (await conn.execute(_INBOUND_PENDING, {"homes": homes, "limit": limit})).all()
    return [RefundMessage.from_row(r) for r in rows]


async def outbound_settleable(conn: AsyncConnection, *, homes: list[str],
                              limit: int) -> list[RefundOutcome]:
    """Our pending refunds whose result has replicated back."""
    rows = (await conn.execute(_OUTBOUND_SETTLEABLE, {"homes": homes, "limit": limit})).all()
    return [RefundOutcome(r.refund_id, r.outcome, r.reason, r.payer_id) for r in rows]


async def message_for(conn: AsyncConnection, refund_id: uuid.UUID) -> RefundMessage | None:
    """The transfer message of a pending cross-region refund (None once settled)."""
    row = (await conn.execute(sa.select(R).where(
        R.c.id == refund_id, R.c.status == PENDING,
        R.c.payer_home != R.c.home_region))).one_or_none()
    return RefundMessage.from_row(row) if row is not None else None


# --------------------------------------------------------------------------- reads

async def get_refund(conn: AsyncConnection, refund_id: uuid.UUID) -> Row[Any]:
    """Read a refund; NotFound if it is not here."""
    row = (await conn.execute(sa.select(R).where(R.c.id == refund_id))).one_or_none()
    if row is None:
        raise NotFound(f"No such refund: '{refund_id}'")
    return row


async def list_for_payment(conn: AsyncConnection, payment_id: uuid.UUID) -> list[Row[Any]]:
    """This region's copy of a payment's refunds, oldest first."""
    return list((await conn.execute(
        sa.select(R).where(R.c.payment_id == payment_id).order_by(R.c.id))).all())


async def require_party(conn: AsyncConnection, principal: Principal, row: Row[Any]) -> None:
    """Forbidden unless the caller owns the refund's payer or payee account (or is an
    admin). The payer is read from the refund, else from the payment's copy here."""
    if principal.is_admin:
        return
    payer = row.payer_id or await _payer_of(conn, row.payment_id)
    payee = row.payee_id
    if payee is None:
        payee = (await conn.execute(sa.select(P.c.payee_id).where(P.c.id == row.payment_id))
                 ).scalar_one_or_none()
    ids = [a for a in (payer, payee) if a is not None]
    owners = (await conn.execute(sa.select(A.c.principal_id).where(A.c.id.in_(ids)))
              ).scalars().all() if ids else []
    access.require(principal, owners, "refund")
