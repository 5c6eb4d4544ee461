"""Orphan credits parked in suspense (region_node.suspense), on a real node and store.

The situation after a local-mode crash of a payer's region: this region (us-east) credited
a payee from its clearing account for a transfer whose payment and debit were lost with
the crashed region (eu-west), and the reconciliation listing names that credit. Many
parkers at once must post it exactly once (exactly one of them wins), and the ledger must
balance afterwards with nothing in transit. The race runs on a node without workers, so
the parkers are the only ones racing (the node's own worker, which parks it too in a real
region, is covered by the local-mode crash drill in tests/test_drills.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import suspense, transfers
from region_node.config import RegionSettings
from region_node.db import Database
from region_node.ids import new_id
from region_node.regions import RegionCatalog
from tests.conftest import app_client
from tests.helpers import check_ledger, open_account

pytestmark = pytest.mark.integration

PARKERS = 24
AMOUNT = 4_321


async def _orphan_credit(db: Database, payee: str) -> tuple[uuid.UUID, uuid.UUID]:
    """Credit `payee` for a transfer from eu-west whose payment this store never gets;
    returns (payment id, credit journal id)."""
    catalog = RegionCatalog()

    def eu_id() -> uuid.UUID:
        return catalog.stamp(new_id(), "eu-west")

    message = transfers.TransferMessage(
        id=eu_id(), payment_id=eu_id(), payer_id=eu_id(),
        payee_id=uuid.UUID(payee), from_home="eu-west", to_home="us-east", amount=AMOUNT,
        currency="USD")

    async def step(conn: AsyncConnection) -> transfers.TransferOutcome:
        return await transfers.receive(conn, region="us-east", message=message)

    outcome = await db.transaction(step)
    assert outcome.outcome == "credited"
    return message.payment_id, message.id


def _list_item(db_url: str, payment_id: uuid.UUID, transfer_id: uuid.UUID) -> None:
    """The item replication.reconcile.lost_tail records for that credit."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "select r.journal_id, e.account_id from transfer_results r join journal_entries e "
            "on e.journal_id = r.journal_id and e.amount < 0 where r.transfer_id = %s",
            (transfer_id,)).fetchone()
        assert row is not None
        journal_id, clearing = row
        detail = {"payment_id": str(payment_id), "transfer_id": str(transfer_id),
                  "journal_id": str(journal_id), "clearing_account": str(clearing),
                  "credit_region": "us-east", "amount": AMOUNT, "currency": "USD"}
        conn.execute(
            "insert into reconciliation_items (home_region, takeover_epoch, item_id, "
            "item_kind, lost_region, listed_by, status, currency, amount, detail) "
            "values ('eu-west', 7, %s, %s, 'eu-west', 'ap-southeast', 'credited', 'USD', %s, "
            "%s::jsonb)", (journal_id, suspense.ITEM_KIND, AMOUNT, json.dumps(detail)))


def _balances(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        return {str(k): int(v) for k, v in conn.execute(
            "select kind, sum(balance)::bigint from accounts group by kind")}


async def test_orphan_credit_is_parked_once_under_concurrency(
        settings: RegionSettings, db_url: str) -> None:
    async with app_client(settings.model_copy(update={"run_workers": False})) as client:
        payee = await open_account(client, kind="merchant")
        await _park_race(db_url, payee)


async def _park_race(db_url: str, payee: str) -> None:
    db = Database(db_url, pool_size=PARKERS, max_overflow=0)
    try:
        payment_id, transfer_id = await _orphan_credit(db, payee)
        assert _balances(db_url)["clearing"] == -AMOUNT  # as if money had been created
        _list_item(db_url, payment_id, transfer_id)
        async with db.engine.connect() as conn:
            found = await suspense.pending(conn, region="us-east", limit=10)
        # No worker runs: it is pending until one of the parkers below posts it.
        assert [c.payment_id for c in found] == [payment_id]

        async def park_once(credit: suspense.OrphanCredit) -> bool:
            async def step(conn: AsyncConnection) -> bool:
                return await suspense.park(conn, region="us-east", credit=credit)
            return await db.transaction(step)

        results = await asyncio.gather(*(park_once(found[0]) for _ in range(PARKERS)))
        assert sum(results) == 1, results  # exactly one parker wins
        async with db.engine.connect() as conn:
            assert await suspense.pending(conn, region="us-east", limit=10) == []
    finally:
        await db.engine.dispose()

    with psycopg.connect(db_url) as conn:
        postings = conn.execute(
            "select account_id, amount from journal_entries where payment_id = %s "
            "and entry_type = %s", (payment_id, suspense.ENTRY_TYPE)).fetchall()
    assert len(postings) == 2 and sorted(a for _, a in postings) == [-AMOUNT, AMOUNT]
    balances = _balances(db_url)
    assert balances["clearing"] == 0 and balances["suspense"] == -AMOUNT
    assert balances["merchant"] == AMOUNT
    check_ledger(db_url).assert_sound()


async def test_a_credit_with_its_debit_is_not_parked(client: httpx.AsyncClient,
                                                     db_url: str) -> None:
    """No listed item, nothing parked: an ordinary incoming transfer stays as it is."""
    payee = await open_account(client, kind="merchant")
    db = Database(db_url)
    try:
        await _orphan_credit(db, payee)
        async with db.engine.connect() as conn:
            assert await suspense.pending(conn, region="us-east", limit=10) == []
    finally:
        await db.engine.dispose()
    assert "suspense" not in _balances(db_url)
