"""Orphan credits: park them in the region's suspense account so the ledger balances.

A region in ``local`` durability mode that crashes loses its unreplicated tail. If a
cross-region payment in that tail had already been pushed to the payee's region (the push
goes out right after the payer's commit, before replication), the payee was credited out
of that region's clearing account while the debit that fed it is gone from every
surviving copy. The clearing account stays short by the amount: money in transit below
zero, as if money had been created.

`replication.reconcile.lost_tail` lists such a credit as a ``orphan_credit`` item in
``reconciliation_items`` (replicated). The region whose clearing account paid it (and
only that region: it alone writes its system accounts) then moves the amount from its
suspense account into the clearing account, once per payment. Nothing is taken back from
the payee and nothing is charged to the payer: deciding that is the operator's, with the
customers. The suspense balance shows the exposure until then; the invariants count it
as money accounted for (`cluster.invariants`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import ledger

ENTRY_TYPE = "suspense"
ITEM_KIND = "orphan_credit"

# Items naming one of our clearing accounts that no suspense posting answers yet.
_PENDING = sa.text("""
    select r.item_id, (r.detail->>'payment_id')::uuid as payment_id,
           (r.detail->>'clearing_account')::uuid as clearing_account, r.amount, r.currency
      from reconciliation_items r
      join accounts a on a.id = (r.detail->>'clearing_account')::uuid
     where r.item_kind = :kind and a.home_region = :region and a.kind = 'clearing'
       and not exists (select 1 from journal_entries e
                        where e.payment_id = (r.detail->>'payment_id')::uuid
                          and e.entry_type = :entry_type)
     order by r.created_at
     limit :limit""")

_POSTED = sa.text("""
    select 1 from journal_entries where payment_id = :payment_id and entry_type = :entry_type
     limit 1""")


@dataclass(frozen=True)
class OrphanCredit:
    """One credit of ours whose debit was lost elsewhere."""

    item_id: uuid.UUID
    payment_id: uuid.UUID
    clearing_account: uuid.UUID
    amount: int
    currency: str


async def pending(conn: AsyncConnection, *, region: str, limit: int) -> list[OrphanCredit]:
    """Orphan credits paid out of `region`'s clearing accounts and not parked yet."""
    rows = (await conn.execute(_PENDING, {"kind": ITEM_KIND, "region": region,
                                          "entry_type": ENTRY_TYPE, "limit": limit})).all()
    return [OrphanCredit(r.item_id, r.payment_id, r.clearing_account, int(r.amount),
                         str(r.currency)) for r in rows]


async def is_parked(conn: AsyncConnection, payment_id: uuid.UUID) -> bool:
    """Whether the orphan credit of `payment_id` has its suspense posting here."""
    return (await conn.execute(_POSTED, {"payment_id": payment_id,
                                         "entry_type": ENTRY_TYPE})).first() is not None


async def park(conn: AsyncConnection, *, region: str, credit: OrphanCredit) -> bool:
    """Move `credit`'s amount from `region`'s suspense account into the clearing account
    that paid it (one journal, keyed to the payment). Idempotent: False if it was already
    parked. Runs inside the caller's transaction."""
    suspense = await ledger.system_account(conn, region=region, kind="suspense",
                                           currency=credit.currency)
    # Under the clearing account's lock a second delivery of the same item waits, then
    # finds the posting made.
    await ledger.lock_accounts(conn, [credit.clearing_account, suspense])
    if await is_parked(conn, credit.payment_id):
        return False
    await ledger.post(conn, legs=[(suspense, -credit.amount),
                                  (credit.clearing_account, credit.amount)],
                      currency=credit.currency, entry_type=ENTRY_TYPE,
                      payment_id=credit.payment_id, region=region)
    return True
