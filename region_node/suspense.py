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

Refunds travel the other way: a refund started by a region that then lost its tail may
have been credited to the payer already (``orphan_refund_credit``); the payer region's
clearing account paid it, and that region parks it the same way, once per item.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import ledger

ENTRY_TYPE = "suspense"
ITEM_KIND = "orphan_credit"
REFUND_ITEM_KIND = "orphan_refund_credit"
"""A payer's refund credit whose merchant debit was lost in the payee region's tail."""
REFUND_ENTRY_TYPE = "suspense_refund"
"""Its own entry type: `is_parked` (a payment's orphan credit) must not see it."""

# The posting that parks an orphan refund credit gets a journal id derived from the item
# (a payment may have several refunds, so the payment id cannot key it): one posting per
# item, however often the scan sees it. Only the credit region posts it.
_REFUND_PARK_NAMESPACE = uuid.UUID("5b0f8f0e-3c1e-4f57-9a53-5d0c1f7e2a14")


def refund_park_journal(item_id: uuid.UUID) -> uuid.UUID:
    """The journal id of the posting that parks orphan refund credit `item_id`."""
    return uuid.uuid5(_REFUND_PARK_NAMESPACE, str(item_id))

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


# Orphan refund credits naming one of our clearing accounts, not parked yet.
_PENDING_REFUNDS = sa.text("""
    select r.item_id, (r.detail->>'payment_id')::uuid as payment_id,
           (r.detail->>'clearing_account')::uuid as clearing_account, r.amount, r.currency
      from reconciliation_items r
      join accounts a on a.id = (r.detail->>'clearing_account')::uuid
     where r.item_kind = :kind and a.home_region = :region and a.kind = 'clearing'
     order by r.created_at
     limit :limit""")


async def is_refund_credit_parked(conn: AsyncConnection, item_id: uuid.UUID) -> bool:
    """Whether orphan refund credit `item_id` has its suspense posting here."""
    found = (await conn.execute(
        sa.select(sa.literal(1)).select_from(ledger.J)
        .where(ledger.J.c.journal_id == refund_park_journal(item_id)).limit(1))).first()
    return found is not None


async def pending_refund_credits(conn: AsyncConnection, *, region: str,
                                 limit: int) -> list[OrphanCredit]:
    """Orphan refund credits paid out of `region`'s clearing accounts and not parked yet
    (`item_id` is the credit's journal, as listed)."""
    rows = (await conn.execute(_PENDING_REFUNDS, {"kind": REFUND_ITEM_KIND, "region": region,
                                                  "limit": limit})).all()
    out = []
    for r in rows:
        if not await is_refund_credit_parked(conn, r.item_id):
            out.append(OrphanCredit(r.item_id, r.payment_id, r.clearing_account,
                                    int(r.amount), str(r.currency)))
    return out


async def park_refund_credit(conn: AsyncConnection, *, region: str,
                             credit: OrphanCredit) -> bool:
    """Move an orphan refund credit's amount from `region`'s suspense account into the
    clearing account that paid it. Idempotent per item: False if already parked."""
    suspense = await ledger.system_account(conn, region=region, kind="suspense",
                                           currency=credit.currency)
    await ledger.lock_accounts(conn, [credit.clearing_account, suspense])
    if await is_refund_credit_parked(conn, credit.item_id):
        return False
    await ledger.post(conn, legs=[(suspense, -credit.amount),
                                  (credit.clearing_account, credit.amount)],
                      currency=credit.currency, entry_type=REFUND_ENTRY_TYPE,
                      payment_id=credit.payment_id, region=region,
                      journal_id=refund_park_journal(credit.item_id))
    return True
