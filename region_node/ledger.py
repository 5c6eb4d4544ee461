"""The double-entry ledger: accounts, immutable journal postings, deposits and withdrawals.

Every function here runs inside the caller's transaction (an AsyncConnection), so a
business step composes several ledger steps atomically. Balances are a cache of the
journal kept in the same transaction; the journal itself must sum to zero per posting
(enforced again by a deferred trigger in the database).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema
from region_node.errors import Conflict, InsufficientFunds, InvalidRequest, NotFound
from region_node.ids import new_id
from region_node.payment_states import PROCESSING

A = schema.accounts
J = schema.journal_entries

USER_KINDS = ("customer", "merchant")
SYSTEM_KINDS = ("funding", "clearing", "suspense", "channel", "payout", "fees")
"""A region's own accounts per currency: outside money, money in transit, credits parked
for reconciliation (`region_node.suspense`), and the acquirer's clearing, payouts on their
way out and the acquirer's fees (`region_node.channel_ops`)."""


@dataclass(frozen=True)
class Account:
    """A snapshot of an account row."""

    id: uuid.UUID
    currency: str
    kind: str
    home_region: str
    balance: int
    held: int
    allow_overdraft: bool
    status: str
    created_at: datetime
    # The principal the account belongs to (None for system accounts).
    principal_id: uuid.UUID | None = None

    @property
    def available(self) -> int:
        """Balance minus what holds have reserved."""
        return self.balance - self.held

    def can_spend(self, amount: int) -> bool:
        """True if `amount` may leave this account now (overdraft accounts always can)."""
        return self.allow_overdraft or self.available >= amount

    def to_api(self) -> dict[str, object]:
        """The public JSON shape of an account."""
        return {
            "id": str(self.id), "object": "account", "currency": self.currency,
            "kind": self.kind, "home_region": self.home_region, "balance": self.balance,
            "available": self.available, "held": self.held,
            "allow_overdraft": self.allow_overdraft, "status": self.status,
            "created_at": self.created_at.isoformat(),
            "principal_id": str(self.principal_id) if self.principal_id else None,
        }


def _account(row: Row[tuple[object, ...]]) -> Account:
    m = row._mapping
    return Account(id=m["id"], currency=m["currency"], kind=m["kind"],
                   home_region=m["home_region"], balance=m["balance"], held=m["held"],
                   allow_overdraft=m["allow_overdraft"], status=m["status"],
                   created_at=m["created_at"], principal_id=m.get("principal_id"))


async def open_account(conn: AsyncConnection, *, account_id: uuid.UUID, currency: str,
                       kind: str, home_region: str, allow_overdraft: bool = False,
                       principal_id: uuid.UUID | None = None) -> Account:
    """Open an empty account (its id stamped with its home region by the caller) that
    belongs to `principal_id`."""
    row = (await conn.execute(
        A.insert().values(id=account_id, currency=currency, kind=kind, home_region=home_region,
                          allow_overdraft=allow_overdraft, principal_id=principal_id)
        .returning(*A.c))).one()
    return _account(row)


async def get_account(conn: AsyncConnection, account_id: uuid.UUID, *,
                      param: str | None = None) -> Account:
    """Read one account (no lock); NotFound if it does not exist."""
    row = (await conn.execute(sa.select(A).where(A.c.id == account_id))).one_or_none()
    if row is None:
        raise NotFound(f"No such account: '{account_id}'", param=param)
    return _account(row)


async def lock_accounts(conn: AsyncConnection, ids: Sequence[uuid.UUID],
                        params: Sequence[str] | None = None) -> dict[uuid.UUID, Account]:
    """Lock accounts FOR UPDATE in one global order; NotFound for a missing one.

    The order is: customer and merchant accounts by id, then the region's system accounts
    (funding, clearing) by id. Every business step locks in that order, also across
    several calls (payer first, clearing account later), so two steps touching the same
    accounts in opposite directions, or a payment and an incoming transfer sharing the
    clearing account, can never deadlock.
    """
    system_last = sa.case((A.c.kind.in_(SYSTEM_KINDS), 1), else_=0)
    rows = (await conn.execute(
        sa.select(A).where(A.c.id.in_(ids)).order_by(system_last, A.c.id)
        .with_for_update())).all()
    found = {row.id: _account(row) for row in rows}
    for i, account_id in enumerate(ids):
        if account_id not in found:
            param = params[i] if params else None
            raise NotFound(f"No such account: '{account_id}'", param=param)
    return found


async def system_account(conn: AsyncConnection, *, region: str, kind: str,
                         currency: str) -> uuid.UUID:
    """The region's funding (outside money) or clearing (in transit) account for a currency.

    Created on first use. Only this region ever inserts its own system accounts, so the
    unique key cannot collide across regions once the table replicates.
    """
    sel = sa.select(A.c.id).where(A.c.home_region == region, A.c.kind == kind,
                                  A.c.currency == currency)
    found = (await conn.execute(sel)).scalar_one_or_none()
    if found is not None:
        return found
    stmt = (pg_insert(A)
            .values(id=new_id(), currency=currency, kind=kind, home_region=region,
                    allow_overdraft=True)
            .on_conflict_do_nothing())
    await conn.execute(stmt)
    return (await conn.execute(sel)).scalar_one()


def require_open(account: Account, *, param: str) -> None:
    """Refuse (400 ``account_closed``) a closed account. Call it on a row locked FOR UPDATE:
    closing takes the same lock, so the account cannot close between check and posting."""
    if account.status != "open":
        raise InvalidRequest(f"Account {account.id} is closed", code="account_closed", param=param)


def require_spendable(account: Account, amount: int, *, param: str = "payer") -> None:
    """Raise InsufficientFunds unless `amount` may leave the account; refuse closed ones."""
    require_open(account, param=param)
    if not account.can_spend(amount):
        raise InsufficientFunds(
            f"Insufficient funds: available {account.available} {account.currency}, "
            f"needed {amount}", param=param)


async def post(conn: AsyncConnection, *, legs: Iterable[tuple[uuid.UUID, int]], currency: str,
               entry_type: str, payment_id: uuid.UUID | None = None, region: str | None = None,
               journal_id: uuid.UUID | None = None) -> uuid.UUID:
    """Append one balanced posting (journal) and move the balances it touches.

    `legs` are (account_id, signed amount): positive credits the account. They must sum to
    zero; the caller has already locked the accounts and checked what may be spent.
    """
    legs = [(acc, amt) for acc, amt in legs if amt != 0]
    if sum(amt for _, amt in legs) != 0 or not legs:
        raise AssertionError(f"unbalanced posting {legs}")
    journal_id = journal_id or new_id()
    await conn.execute(J.insert(), [
        {"id": new_id(), "journal_id": journal_id, "account_id": acc, "amount": amt,
         "currency": currency, "entry_type": entry_type, "payment_id": payment_id,
         "region": region}
        for acc, amt in legs])
    # One statement for every leg's balance (plain SQL: its compiled form is cached,
    # unlike a VALUES list built per call).
    await conn.execute(_MOVE_BALANCES, {"ids": [acc for acc, _ in legs],
                                        "deltas": [amt for _, amt in legs]})
    return journal_id


_MOVE_BALANCES = sa.text("""
    update accounts a set balance = a.balance + d.delta, updated_at = now()
      from unnest(cast(:ids as uuid[]), cast(:deltas as bigint[])) as d(id, delta)
     where a.id = d.id""")


async def change_hold(conn: AsyncConnection, account_id: uuid.UUID, delta: int) -> None:
    """Reserve (delta > 0) or release (delta < 0) part of an account's balance."""
    await conn.execute(A.update().where(A.c.id == account_id)
                       .values(held=A.c.held + delta, updated_at=sa.func.now()))


async def deposit(conn: AsyncConnection, *, region: str, account_id: uuid.UUID,
                  amount: int) -> dict[str, object]:
    """Fund an account from outside: the region's funding account pays for it."""
    account = await get_account(conn, account_id)
    if account.kind not in USER_KINDS:
        raise InvalidRequest("Deposits go to customer or merchant accounts", param="account")
    funding = await system_account(conn, region=region, kind="funding", currency=account.currency)
    locked = await lock_accounts(conn, [account_id, funding])
    require_open(locked[account_id], param="account")
    journal_id = await post(conn, legs=[(funding, -amount), (account_id, amount)],
                            currency=account.currency, entry_type="deposit", region=region)
    return await _movement(conn, "deposit", journal_id, account_id, amount, account.currency)


async def withdraw(conn: AsyncConnection, *, region: str, account_id: uuid.UUID,
                   amount: int) -> dict[str, object]:
    """Pay money out of an account to outside; never below its available balance."""
    account = await get_account(conn, account_id)
    if account.kind not in USER_KINDS:
        raise InvalidRequest("Withdrawals come from customer or merchant accounts",
                             param="account")
    funding = await system_account(conn, region=region, kind="funding", currency=account.currency)
    locked = await lock_accounts(conn, [account_id, funding])
    require_spendable(locked[account_id], amount, param="amount")
    if locked[account_id].available < amount:
        # An overdraft covers payments inside the ledger, never money paid out of it.
        raise InsufficientFunds(
            f"Insufficient funds: available {locked[account_id].available} "
            f"{account.currency}, needed {amount} (withdrawals never overdraw)",
            param="amount")
    journal_id = await post(conn, legs=[(account_id, -amount), (funding, amount)],
                            currency=account.currency, entry_type="withdrawal", region=region)
    return await _movement(conn, "withdrawal", journal_id, account_id, amount, account.currency)


async def _movement(conn: AsyncConnection, kind: str, journal_id: uuid.UUID,
                    account_id: uuid.UUID, amount: int, currency: str) -> dict[str, object]:
    account = await get_account(conn, account_id)
    return {"id": str(journal_id), "object": kind, "account_id": str(account_id),
            "amount": amount, "currency": currency, "balance": account.balance,
            "available": account.available, "created_at": datetime.now(UTC).isoformat()}


async def close_account(conn: AsyncConnection, account_id: uuid.UUID) -> Account:
    """Close an empty account; a closed account receives nothing more.

    Refused while a payment from it (or a refund out of it) is still in transit to another
    region: if the other region rejects it, the saga gives the money back to this account,
    which needs to be open.
    Payments start from (and reversals credit) the payer's locked row, so no payment can
    slip in between this check and the close."""
    locked = (await lock_accounts(conn, [account_id]))[account_id]
    if locked.balance != 0 or locked.held != 0:
        raise Conflict("Only an account with zero balance and no holds can be closed",
                       code="account_not_empty")
    in_transit = (await conn.execute(
        sa.select(sa.func.count()).select_from(schema.payments)
        .where(schema.payments.c.payer_id == account_id,
               schema.payments.c.status == PROCESSING))).scalar_one()
    if in_transit:
        raise Conflict("A payment from this account is still in transit; close it once the "
                       "payment has settled", code="account_not_empty")
    # Likewise a refund out of this (merchant) account still in transit: if the payer's
    # region rejects it, the saga re-credits this account (region_node.refunds.settle).
    # Refunds start from the payee's locked row, so none can slip in after this check.
    refunding = (await conn.execute(
        sa.select(sa.func.count()).select_from(schema.refunds)
        .where(schema.refunds.c.payee_id == account_id,
               schema.refunds.c.status == "pending"))).scalar_one()
    if refunding:
        raise Conflict("A refund from this account is still in transit; close it once the "
                       "refund has settled", code="account_not_empty")
    row = (await conn.execute(A.update().where(A.c.id == account_id)
                              .values(status="closed", updated_at=sa.func.now())
                              .returning(*A.c))).one()
    return _account(row)


async def list_entries(conn: AsyncConnection, account_id: uuid.UUID, *, limit: int,
                       starting_after: uuid.UUID | None) -> dict[str, object]:
    """Journal entries of an account, newest first; the cursor is the last entry id seen."""
    await get_account(conn, account_id)
    query = sa.select(J).where(J.c.account_id == account_id)
    if starting_after is not None:
        query = query.where(J.c.id < starting_after)
    rows = (await conn.execute(query.order_by(J.c.id.desc()).limit(limit + 1))).all()
    data = [{
        "id": str(r.id), "object": "entry", "journal_id": str(r.journal_id),
        "account_id": str(r.account_id), "amount": r.amount, "currency": r.currency,
        "entry_type": r.entry_type, "payment_id": str(r.payment_id) if r.payment_id else None,
        "created_at": r.created_at.isoformat()} for r in rows[:limit]]
    has_more = len(rows) > limit
    return {"object": "list", "data": data, "has_more": has_more,
            "next_cursor": data[-1]["id"] if has_more and data else None}
