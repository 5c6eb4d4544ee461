"""Money from outside and back: card pay-ins and bank payouts through the channel.

Every function runs inside the caller's transaction, behind the ownership fence of the
account's home region (one writer per row: only that region inserts or updates an
operation). The money paths:

- pay-in: nothing moves when it starts (the card goes straight to the channel). When the
  channel confirms the capture, the account is credited from the region's `channel`
  clearing account for the currency (which goes negative, like `funding`: money that came
  in from outside). Declined or failed: nothing ever moved.
- payout: the account is debited into the region's `payout` clearing account at once, in
  the transaction that inserts the operation. Paid: `payout` -> `channel` (the money left
  through the channel). Returned or failed: `payout` -> the account (money back).

An operation's status only moves forward (queued -> pending -> one terminal status) and
is settled exactly once: settling locks the operation row and checks it is not terminal;
the channel's answers are applied only if their `version` is above the one applied.
A channel success that arrives after we gave up (compensation failed the operation) moves
no money: it becomes a reconciliation item for an operator.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import ledger, schema
from region_node.errors import InsufficientFunds, InvalidRequest, NotFound
from region_node.outbox import write_event

O = schema.channel_operations  # noqa: E741 - the table, like P for payments

# The channel worker's polls (`waiting`, every `queue_poll_seconds` and every
# `compensation_seconds`, usually finding nothing): prebuilt, nothing compiled per poll.
# The literal status list is the predicate of the partial index ix_chop_waiting: it
# lets a generic (prepared) plan use the index, which `status = :status` alone cannot.
_WAITING = sa.text("""
    select * from channel_operations
     where home_region = :home and status = :status and status in ('queued', 'pending')
       and next_check_at <= now()
     order by next_check_at limit :limit
       for update skip locked
""")
_LEASE = sa.text("""
    update channel_operations
       set next_check_at = now() + make_interval(secs => cast(:secs as double precision))
     where id = any(cast(:ids as uuid[]))
""")
CB = schema.channel_callbacks
E = schema.ownership_epochs

PAYIN, PAYOUT = "payin", "payout"
QUEUED, PENDING = "queued", "pending"
SUCCEEDED, PAID, RETURNED, FAILED = "succeeded", "paid", "returned", "failed"
WAITING = (QUEUED, PENDING)
TERMINAL = (SUCCEEDED, PAID, RETURNED, FAILED)

CHANNEL, PAYOUT_CLEARING, FEES = "channel", "payout", "fees"
"""System account kinds (ledger.SYSTEM_KINDS)."""

TIMEOUT_CODE = "channel_timeout"
RECON_EPOCH = 0
"""`takeover_epoch` of reconciliation items about the channel: they come from no
takeover, and epoch 0 is never a takeover's."""

# The channel's statuses and what they settle: None = still on its way.
_OUTCOMES: dict[str, dict[str, str]] = {
    PAYIN: {"captured": SUCCEEDED, "declined": FAILED, "failed": FAILED},
    PAYOUT: {"paid": PAID, "returned": RETURNED, "failed": FAILED},
}


def outcome_of(kind: str, channel_status: str) -> str | None:
    """Our terminal status for the channel's `channel_status` of a `kind` operation, or
    None while the channel is still working on it (pending, authorized)."""
    return _OUTCOMES[kind].get(channel_status)


def same_money(kind: str, ours: str, outcome: str) -> bool:
    """True if two terminal outcomes moved the same money: equal, or for a payout both
    ended with the money back (returned by the bank, or failed: ours may say failed
    because we gave up, the channel's returned)."""
    back = (RETURNED, FAILED)
    return ours == outcome or (kind == PAYOUT and ours in back and outcome in back)


@dataclass(frozen=True)
class ChannelAnswer:
    """What the channel says about an operation (a callback's data or a status query)."""

    status: str
    version: int
    failure_code: str | None = None
    fee: int = 0

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ChannelAnswer:
        """From the channel's operation JSON."""
        return cls(status=str(doc["status"]), version=int(doc["version"]),
                   failure_code=doc.get("failure_code"), fee=int(doc.get("fee") or 0))


def card_brand(digits: str) -> str:
    """The card network, from the number's leading digits (for display only)."""
    if digits.startswith("4"):
        return "visa"
    if digits[:2] in {"51", "52", "53", "54", "55"} or "2221" <= digits[:4] <= "2720":
        return "mastercard"
    if digits[:2] in {"34", "37"}:
        return "amex"
    return "unknown"


def to_api(row: Row[Any]) -> dict[str, Any]:
    """The public JSON shape of a pay-in or payout (never a card number: last four only)."""
    out: dict[str, Any] = {
        "id": str(row.id), "object": row.kind, "account_id": str(row.account_id),
        "amount": row.amount, "currency": row.currency, "status": row.status,
        "failure_code": row.failure_code, "channel_status": row.channel_status,
        "home_region": row.home_region, "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
        "settled_at": row.settled_at.isoformat() if row.settled_at else None,
        "settled_by": row.settled_by,
    }
    if row.kind == PAYIN:
        out["card"] = {"last4": row.card_last4, "brand": row.card_brand}
    else:
        out["bank_account"] = {"last4": (row.bank_account or "")[-4:],
                               "holder_name": row.holder_name}
    return out


async def get_operation(conn: AsyncConnection, op_id: uuid.UUID, *,
                        for_update: bool = False) -> Row[Any]:
    """One operation; NotFound if this store does not have it."""
    query = sa.select(O).where(O.c.id == op_id)
    if for_update:
        query = query.with_for_update()
    row = (await conn.execute(query)).one_or_none()
    if row is None:
        raise NotFound(f"No such operation: '{op_id}'")
    return row


def _epoch(home: str) -> Any:
    # The ownership epoch the row is written under (the fence has share-locked it).
    return (sa.select(sa.func.max(E.c.epoch)).where(E.c.home_region == home)
            .scalar_subquery())


def _check_account(account: ledger.Account, param: str = "account") -> None:
    if account.kind not in ledger.USER_KINDS:
        raise InvalidRequest("Pay-ins and payouts use customer or merchant accounts",
                             param=param)
    ledger.require_open(account, param=param)


async def create_payin(conn: AsyncConnection, *, op_id: uuid.UUID, account_id: uuid.UUID,
                       amount: int, card_last4: str, card_brand: str,
                       stuck_after: float) -> Row[Any]:
    """Record a card pay-in as `pending` (no money moves until the channel confirms).
    The compensation job looks at it `stuck_after` seconds from now if still pending."""
    account = await ledger.get_account(conn, account_id)
    _check_account(account)
    row = (await conn.execute(O.insert().values(
        id=op_id, kind=PAYIN, account_id=account_id, home_region=account.home_region,
        amount=amount, currency=account.currency, status=PENDING, card_last4=card_last4,
        card_brand=card_brand, epoch=_epoch(account.home_region),
        next_check_at=sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, stuck_after),
    ).returning(*O.c))).one()
    await _event(conn, row, "payin.created")
    return row


async def create_payout(conn: AsyncConnection, *, region: str, op_id: uuid.UUID,
                        account_id: uuid.UUID, amount: int, bank_account: str,
                        holder_name: str, queued: bool, stuck_after: float) -> Row[Any]:
    """Debit the account into the payout clearing account and record the payout, in one
    transaction: `pending` (about to be sent) or `queued` (the breaker is open; the worker
    sends it when the channel is back). Never beyond the available balance, overdraft or
    not: money leaving the ledger is never borrowed."""
    account = await ledger.get_account(conn, account_id)
    _check_account(account)
    clearing = await ledger.system_account(conn, region=region, kind=PAYOUT_CLEARING,
                                           currency=account.currency)
    locked = await ledger.lock_accounts(conn, [account_id, clearing])
    _check_account(locked[account_id])
    if locked[account_id].available < amount:
        raise InsufficientFunds(
            f"Insufficient funds: available {locked[account_id].available} "
            f"{account.currency}, needed {amount} (payouts never overdraw)", param="amount")
    await ledger.post(conn, legs=[(account_id, -amount), (clearing, amount)],
                      currency=account.currency, entry_type="payout", payment_id=op_id,
                      region=region)
    row = (await conn.execute(O.insert().values(
        id=op_id, kind=PAYOUT, account_id=account_id, home_region=account.home_region,
        amount=amount, currency=account.currency, status=QUEUED if queued else PENDING,
        bank_account=bank_account, holder_name=holder_name,
        epoch=_epoch(account.home_region),
        next_check_at=sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, stuck_after),
    ).returning(*O.c))).one()
    await _event(conn, row, "payout.created")
    return row


async def mark_sent(conn: AsyncConnection, op_id: uuid.UUID, stuck_after: float) -> Row[Any]:
    """A queued payout went to the channel: `pending` from now (forward only)."""
    row = (await conn.execute(
        O.update().where(O.c.id == op_id, O.c.status == QUEUED)
        .values(status=PENDING, updated_at=sa.func.now(),
                next_check_at=sa.func.now()
                + sa.func.make_interval(0, 0, 0, 0, 0, 0, stuck_after))
        .returning(*O.c))).one_or_none()
    return row if row is not None else await get_operation(conn, op_id)


@dataclass(frozen=True)
class Applied:
    """What applying a channel answer did: `settled` (money moved, status terminal),
    `progress` (newer channel status, nothing to settle yet), `stale` (a version we had
    already applied, or older), `already_settled` (same outcome as ours, nothing moved),
    `late_after_reversal` (the channel succeeded after we gave up: a reconciliation item),
    `conflict` (another terminal answer than ours: a reconciliation item)."""

    outcome: str
    row: Row[Any]


async def apply_answer(conn: AsyncConnection, *, region: str, op_id: uuid.UUID,
                       answer: ChannelAnswer, source: str) -> Applied:
    """Apply what the channel says about an operation, exactly once and never backwards.
    `source` names who learned it (callback, sync, statement, send) for the record."""
    op = await get_operation(conn, op_id, for_update=True)
    if answer.version <= op.channel_version:
        return Applied("stale", op)
    outcome = outcome_of(op.kind, answer.status)
    values: dict[str, Any] = {"channel_status": answer.status,
                              "channel_version": answer.version, "updated_at": sa.func.now()}
    if answer.fee:
        values["fee"] = answer.fee
    if op.status in TERMINAL:
        row = (await conn.execute(O.update().where(O.c.id == op.id).values(**values)
                                  .returning(*O.c))).one()
        if outcome is None or same_money(op.kind, op.status, outcome):
            return Applied("already_settled", row)
        # The channel took money in (or paid out) after we had failed and reversed the
        # operation, or answered otherwise than what we settled: never a second posting.
        late = op.failure_code == TIMEOUT_CODE and outcome in (SUCCEEDED, PAID)
        kind = "channel_late_success" if late else "channel_status_conflict"
        await list_item(conn, region=region, op=row, item_kind=kind, detail={
            "ours": op.status, "channel": answer.status, "source": source,
            "channel_version": answer.version})
        return Applied("late_after_reversal" if late else "conflict", row)
    if outcome is None:
        row = (await conn.execute(O.update().where(O.c.id == op.id).values(**values)
                                  .returning(*O.c))).one()
        return Applied("progress", row)
    row = await _settle(conn, region=region, op=op, outcome=outcome,
                        failure_code=answer.failure_code, by=source, extra=values)
    return Applied("settled", row)


async def give_up(conn: AsyncConnection, *, region: str, op_id: uuid.UUID,
                  reason: str = TIMEOUT_CODE, by: str = "compensation") -> Row[Any] | None:
    """Fail a still-waiting operation with `reason` and reverse it (a payout's money goes
    back): the compensation job's last step, or the sender's when the channel refused the
    operation or never got it. None if it has settled meanwhile."""
    op = await get_operation(conn, op_id, for_update=True)
    if op.status in TERMINAL:
        return None
    return await _settle(conn, region=region, op=op, outcome=FAILED, failure_code=reason,
                         by=by, extra={})


async def _settle(conn: AsyncConnection, *, region: str, op: Row[Any], outcome: str,
                  failure_code: str | None, by: str, extra: dict[str, Any]) -> Row[Any]:
    """Move the money of a terminal outcome and mark the operation (locked by the caller,
    not terminal yet) settled: the one place money moves on the channel's answer."""
    if op.kind == PAYIN and outcome == SUCCEEDED:
        channel = await ledger.system_account(conn, region=region, kind=CHANNEL,
                                              currency=op.currency)
        locked = await ledger.lock_accounts(conn, [op.account_id, channel])
        if locked[op.account_id].status != "open":
            # The card was charged but the account closed meanwhile: credit nothing, and
            # let an operator refund the card.
            outcome, failure_code = FAILED, "account_closed"
            await list_item(conn, region=region, op=op, item_kind="channel_captured_closed",
                            detail={"channel": "captured", "source": by})
        else:
            await ledger.post(conn, legs=[(channel, -op.amount), (op.account_id, op.amount)],
                              currency=op.currency, entry_type="payin", payment_id=op.id,
                              region=region)
    elif op.kind == PAYOUT and outcome == PAID:
        clearing = await ledger.system_account(conn, region=region, kind=PAYOUT_CLEARING,
                                               currency=op.currency)
        channel = await ledger.system_account(conn, region=region, kind=CHANNEL,
                                              currency=op.currency)
        await ledger.lock_accounts(conn, [clearing, channel])
        await ledger.post(conn, legs=[(clearing, -op.amount), (channel, op.amount)],
                          currency=op.currency, entry_type="payout_paid", payment_id=op.id,
                          region=region)
    elif op.kind == PAYOUT:
        # Returned by the bank, failed, or given up: the money goes back to the account
        # (a return is the customer's money, even into an account closed since).
        clearing = await ledger.system_account(conn, region=region, kind=PAYOUT_CLEARING,
                                               currency=op.currency)
        await ledger.lock_accounts(conn, [op.account_id, clearing])
        await ledger.post(conn, legs=[(clearing, -op.amount), (op.account_id, op.amount)],
                          currency=op.currency, entry_type="payout_returned",
                          payment_id=op.id, region=region)
    row = (await conn.execute(
        O.update().where(O.c.id == op.id)
        .values(**{**extra, "status": outcome, "failure_code": failure_code,
                   "settled_by": by, "settled_at": sa.func.now(),
                   "updated_at": sa.func.now(), "next_check_at": None})
        .returning(*O.c))).one()
    await _event(conn, row, f"{row.kind}.{row.status}")
    return row


async def _event(conn: AsyncConnection, row: Row[Any], event_type: str) -> None:
    await write_event(conn, region=row.home_region, event_type=event_type,
                      aggregate_id=row.id, payload=to_api(row))


async def record_callback(conn: AsyncConnection, *, event_id: str, op_id: uuid.UUID | None,
                          reference: str, event_type: str, version: int, region: str
                          ) -> bool:
    """Put a callback in the inbox; False if its event id was there already (a duplicate
    delivery: nothing more to do)."""
    inserted = (await conn.execute(
        pg_insert(CB).values(
            event_id=event_id, operation_id=op_id, reference=reference,
            event_type=event_type, version=version, outcome="received", region=region)
        .on_conflict_do_nothing().returning(CB.c.event_id))).one_or_none()
    return inserted is not None


async def set_callback_outcome(conn: AsyncConnection, event_id: str, outcome: str) -> None:
    """What the inbox row's callback did (for operators reading the inbox)."""
    await conn.execute(CB.update().where(CB.c.event_id == event_id).values(outcome=outcome))


def item_id(home_region: str, key: str) -> uuid.UUID:
    """A reconciliation item's id, the same for the same difference every time (so a
    second run of a job lists nothing twice)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"paycluster:channel:{home_region}:{key}")


async def list_item(conn: AsyncConnection, *, region: str, op: Row[Any] | None,
                    item_kind: str, detail: dict[str, Any], key: str | None = None,
                    home_region: str | None = None, amount: int | None = None,
                    currency: str | None = None, status: str | None = None) -> bool:
    """List a difference with the channel for an operator (`reconciliation_items`, settled
    with the existing resolutions), once per (home region, `key`); True if new. Listed
    by the region serving the home region (the one writer of that key)."""
    home = home_region or (op.home_region if op is not None else region)
    key = key or f"{op.id if op is not None else 'none'}:{item_kind}"
    if op is not None:
        detail = {"operation_id": str(op.id), "kind": op.kind, "account_id": str(op.account_id),
                  **detail}
    row = (await conn.execute(sa.text(
        "insert into reconciliation_items (home_region, takeover_epoch, item_id, item_kind, "
        "lost_region, listed_by, epoch, status, currency, amount, committed_at, detail) "
        "values (:home, :epoch, :item, :kind, :region, :region, :op_epoch, :status, "
        ":currency, :amount, now(), cast(:detail as jsonb)) on conflict do nothing "
        "returning item_id"), {
            "home": home, "epoch": RECON_EPOCH, "item": item_id(home, key), "kind": item_kind,
            "region": region, "op_epoch": op.epoch if op is not None else None,
            "status": status or (op.status if op is not None else None),
            "currency": currency or (op.currency if op is not None else None),
            "amount": amount if amount is not None else (op.amount if op is not None else None),
            "detail": json.dumps(detail)})).one_or_none()
    return row is not None


async def waiting(conn: AsyncConnection, *, home_region: str, status: str, limit: int,
                  lease_seconds: float) -> list[Row[Any]]:
    """Operations of `home_region` in `status` whose next check is due, claimed for
    `lease_seconds` (their next check moves on) so other nodes of the region skip them
    while this one asks the channel outside any transaction."""
    rows = (await conn.execute(_WAITING, {"home": home_region, "status": status,
                                          "limit": limit})).all()
    if rows:
        await conn.execute(_LEASE, {"ids": [r.id for r in rows], "secs": lease_seconds})
    return list(rows)


async def reschedule(conn: AsyncConnection, op_id: uuid.UUID, *, attempts: int,
                     after: float) -> None:
    """Count a status query that left the operation waiting; check again `after` seconds."""
    await conn.execute(
        O.update().where(O.c.id == op_id, O.c.status.in_(WAITING))
        .values(sync_attempts=attempts, updated_at=sa.func.now(),
                next_check_at=sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, after)))


async def settle_waiting(conn: AsyncConnection, *, region: str, op_id: uuid.UUID,
                         channel_status: str, by: str) -> Row[Any] | None:
    """Settle a still-waiting operation from the channel's booked `channel_status` (the
    statement's safe fix: the channel captured, we still wait). None if it is terminal
    already or the status settles nothing."""
    op = await get_operation(conn, op_id, for_update=True)
    outcome = outcome_of(op.kind, channel_status)
    if op.status in TERMINAL or outcome is None:
        return None
    failure = None if outcome in (SUCCEEDED, PAID) else f"channel_{channel_status}"
    return await _settle(conn, region=region, op=op, outcome=outcome, failure_code=failure,
                         by=by, extra={"channel_status": channel_status})


async def post_fee(conn: AsyncConnection, *, region: str, op_id: uuid.UUID, fee: int) -> bool:
    """Charge the channel's fee for an operation to the region's fees account, once per
    operation (the operation row is locked first, so two runs cannot both post it):
    channel clearing +fee (the channel keeps it from what it owes us), fees -fee (what the
    house paid). False if it was posted before."""
    op = await get_operation(conn, op_id, for_update=True)
    posted = (await conn.execute(sa.select(sa.literal(1)).select_from(schema.journal_entries)
                                 .where(schema.journal_entries.c.payment_id == op.id,
                                        schema.journal_entries.c.entry_type == "channel_fee")
                                 .limit(1))).first()
    if posted is not None or fee <= 0:
        return False
    channel = await ledger.system_account(conn, region=region, kind=CHANNEL,
                                          currency=op.currency)
    fees = await ledger.system_account(conn, region=region, kind=FEES, currency=op.currency)
    await ledger.lock_accounts(conn, [channel, fees])
    await ledger.post(conn, legs=[(channel, fee), (fees, -fee)], currency=op.currency,
                      entry_type="channel_fee", payment_id=op.id, region=region)
    await conn.execute(O.update().where(O.c.id == op.id).values(fee=fee))
    return True
