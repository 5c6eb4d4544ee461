"""Payments: create (automatic or manual capture), capture, cancel, expire holds (refunds:
region_node/refunds.py).

Each public function is one business step that runs inside the caller's transaction:
ledger postings, the payment row, the TCC barrier row and the outbox event commit
together or not at all. Manual capture is TCC with the payment id as the global
transaction id and the payer's hold as the branch.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import ledger, schema, tcc, transfers
from region_node import payment_states as st
from region_node.errors import InvalidRequest, NotFound
from region_node.ids import new_id
from region_node.outbox import write_event
from region_node.payment_view import to_api

P = schema.payments
E = schema.ownership_epochs

# The status is spelled out (st.REQUIRES_CAPTURE), not bound: it is the predicate of the
# partial index ix_payments_expiring, which a generic plan could not use for a parameter.
_EXPIRED_HOLDS = sa.text("""
    select id from payments
     where status = 'requires_capture' and hold_expires_at <= now() and home_region = :home
     order by hold_expires_at limit :limit for update skip locked
""")
_EXPIRED_HOLDS_ANY = sa.text("""
    select id from payments
     where status = 'requires_capture' and hold_expires_at <= now()
     order by hold_expires_at limit :limit for update skip locked
""")

PAYER_BRANCH = "payer-hold"


@dataclass(frozen=True)
class PaymentRequest:
    """A validated request to move `amount` from payer to payee.

    `payer_home` / `payee_home` are the accounts' home regions (from their ids); the
    payment is cross-region when they differ. `payment_id` is stamped with `payer_home`.
    """

    payment_id: uuid.UUID
    payer: uuid.UUID
    payee: uuid.UUID
    payer_home: str
    payee_home: str
    amount: int
    currency: str
    capture_method: str = "automatic"
    description: str | None = None

    @property
    def cross_region(self) -> bool:
        """True when the payee lives in another home region (a saga, not one transaction)."""
        return self.payer_home != self.payee_home


async def _event(conn: AsyncConnection, region: str, event_type: str, payment: Row[Any]) -> None:
    await write_event(conn, region=region, event_type=event_type, aggregate_id=payment.id,
                      payload=to_api(payment))


async def get_payment(conn: AsyncConnection, payment_id: uuid.UUID, *,
                      for_update: bool = False) -> Row[Any]:
    """Read a payment; NotFound if it does not exist."""
    query = sa.select(P).where(P.c.id == payment_id)
    if for_update:
        query = query.with_for_update()
    row = (await conn.execute(query)).one_or_none()
    if row is None:
        raise NotFound(f"No such payment: '{payment_id}'")
    return row


async def create_payment(conn: AsyncConnection, *, region: str, request: PaymentRequest,
                         hold_ttl: timedelta) -> Row[Any]:
    """Automatic: debit payer and credit payee now (cross-region: into transit, status
    `processing`). Manual: TCC try, a hold on the payer."""
    if request.payer == request.payee:
        raise InvalidRequest("payer and payee must be different accounts", param="payee")
    if request.cross_region:
        payer = (await ledger.lock_accounts(conn, [request.payer], params=["payer"]))[request.payer]
        payee = await _replica_of(conn, request.payee)
    else:
        accounts = await ledger.lock_accounts(conn, [request.payer, request.payee],
                                              params=["payer", "payee"])
        payer, payee = accounts[request.payer], accounts[request.payee]
    for acc, param in ((payer, "payer"), (payee, "payee")):
        if acc is None:
            continue  # not replicated here yet: the payee's own region decides
        if acc.currency != request.currency:
            raise InvalidRequest(
                f"{param} account holds {acc.currency}, the payment is in {request.currency}",
                code="currency_mismatch", param=param)
        if acc.kind not in ledger.USER_KINDS:
            raise InvalidRequest(f"{param} must be a customer or merchant account", param=param)
    if payee is not None and payee.status != "open" and not request.cross_region:
        raise InvalidRequest(f"Account {payee.id} is closed", code="account_closed", param="payee")
    ledger.require_spendable(payer, request.amount)

    payment_id = request.payment_id
    values: dict[str, Any] = {
        "id": payment_id, "payer_id": request.payer, "payee_id": request.payee,
        "amount": request.amount, "currency": request.currency,
        "capture_method": request.capture_method, "description": request.description,
        "home_region": request.payer_home, "payee_home": request.payee_home,
        # The ownership epoch the payment is written under: the transaction share-locks
        # that epoch's row first (ownership.assert_serving), so it cannot change here.
        "epoch": sa.select(sa.func.max(E.c.epoch))
                   .where(E.c.home_region == request.payer_home).scalar_subquery(),
    }
    if request.capture_method == "manual":
        async def hold() -> None:
            await ledger.change_hold(conn, request.payer, request.amount)

        await tcc.try_phase(conn, payment_id, PAYER_BRANCH, hold)
        # The database's clock, the one `expired_holds` and `capture` compare against.
        values |= {"status": st.REQUIRES_CAPTURE, "amount_held": request.amount,
                   "hold_expires_at": sa.func.now() + hold_ttl}
    elif request.cross_region:
        await transfers.send(conn, region=region, message=_message(request, request.amount))
        values |= {"status": st.PROCESSING, "amount_captured": request.amount}
    else:
        await ledger.post(conn, legs=[(request.payer, -request.amount),
                                      (request.payee, request.amount)],
                          currency=request.currency, entry_type="payment",
                          payment_id=payment_id, region=region)
        values |= {"status": st.SUCCEEDED, "amount_captured": request.amount}
    row = (await conn.execute(P.insert().values(**values).returning(*P.c))).one()
    await _event(conn, region, f"payment.{row.status}", row)
    return row


def _message(request: PaymentRequest, amount: int) -> transfers.TransferMessage:
    # The message id carries the payer's home like every id that region inserts.
    return transfers.TransferMessage(
        id=uuid.UUID(bytes=new_id().bytes[:15] + request.payment_id.bytes[15:]),
        payment_id=request.payment_id, payer_id=request.payer, payee_id=request.payee,
        from_home=request.payer_home, to_home=request.payee_home, amount=amount,
        currency=request.currency)


async def _replica_of(conn: AsyncConnection, account_id: uuid.UUID) -> ledger.Account | None:
    try:
        return await ledger.get_account(conn, account_id)
    except NotFound:
        return None


async def capture(conn: AsyncConnection, *, region: str, payment_id: uuid.UUID,
                  amount: int | None) -> Row[Any]:
    """TCC confirm: post `amount` (default: the whole hold) and release the rest.

    Cross-region, the captured amount goes into transit and the payment is `processing`
    until the payee's region has credited it.
    """
    payment = await get_payment(conn, payment_id, for_update=True)
    cross_region = payment.payee_home is not None and payment.payee_home != payment.home_region
    target = st.PROCESSING if cross_region else st.SUCCEEDED
    st.check_transition(payment.status, target, action="capture")
    if payment.hold_expires_at is not None and await _expired(conn, payment.hold_expires_at):
        raise st.Conflict("The hold on this payment has expired", code="hold_expired")
    to_capture = payment.amount_held if amount is None else amount
    if to_capture > payment.amount_held:
        raise InvalidRequest(
            f"Cannot capture {to_capture}: only {payment.amount_held} is held", param="amount")

    async def confirm() -> None:
        if cross_region:
            await ledger.lock_accounts(conn, [payment.payer_id])
            await ledger.change_hold(conn, payment.payer_id, -payment.amount_held)
            request = PaymentRequest(
                payment_id=payment.id, payer=payment.payer_id, payee=payment.payee_id,
                payer_home=payment.home_region, payee_home=payment.payee_home,
                amount=to_capture, currency=payment.currency)
            await transfers.send(conn, region=region, message=_message(request, to_capture))
            return
        locked = await ledger.lock_accounts(conn, [payment.payer_id, payment.payee_id])
        # The payee may have closed since the hold was made: refuse, the hold stays (the
        # payer may cancel it, or it expires) and nothing moves.
        ledger.require_open(locked[payment.payee_id], param="payee")
        await ledger.change_hold(conn, payment.payer_id, -payment.amount_held)
        await ledger.post(conn, legs=[(payment.payer_id, -to_capture),
                                      (payment.payee_id, to_capture)],
                          currency=payment.currency, entry_type="payment",
                          payment_id=payment.id, region=region)

    await tcc.confirm_phase(conn, payment.id, PAYER_BRANCH, confirm)
    row = (await conn.execute(
        P.update().where(P.c.id == payment.id)
        .values(status=target, amount_captured=to_capture, amount_held=0,
                updated_at=sa.func.now()).returning(*P.c))).one()
    await _event(conn, region, f"payment.{target}", row)
    return row


async def _expired(conn: AsyncConnection, deadline: datetime) -> bool:
    """True if `deadline` has passed by the database's clock (one clock for every hold)."""
    return bool((await conn.execute(sa.select(sa.func.now() >= deadline))).scalar_one())


async def cancel(conn: AsyncConnection, *, region: str, payment_id: uuid.UUID,
                 reason: str = "requested_by_customer") -> Row[Any]:
    """TCC cancel: release the hold; the payment ends `canceled`."""
    payment = await get_payment(conn, payment_id, for_update=True)
    st.check_transition(payment.status, st.CANCELED, action="cancel")

    async def release() -> None:
        await ledger.lock_accounts(conn, [payment.payer_id])
        await ledger.change_hold(conn, payment.payer_id, -payment.amount_held)

    await tcc.cancel_phase(conn, payment.id, PAYER_BRANCH, release, reason=reason)
    row = (await conn.execute(
        P.update().where(P.c.id == payment.id)
        .values(status=st.CANCELED, amount_held=0, failure_code=reason,
                updated_at=sa.func.now()).returning(*P.c))).one()
    await _event(conn, region, "payment.canceled", row)
    return row


async def expired_holds(conn: AsyncConnection, *, limit: int,
                        home_region: str | None = None) -> list[uuid.UUID]:
    """Manual payments (of `home_region`, if given) whose hold has run out, locked so two
    workers never take the same."""
    # Prebuilt text: the expiry worker asks every second, usually to find nothing.
    rows = (await conn.execute(_EXPIRED_HOLDS_ANY if home_region is None else _EXPIRED_HOLDS,
                               {"limit": limit, "home": home_region})).all()
    return [r.id for r in rows]
