"""Test helpers: opening funded accounts over the API and checking the ledger invariants
(ARCHITECTURE.md section 6) straight from the database."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import psycopg


async def open_account(client: httpx.AsyncClient, currency: str = "USD", *, kind: str = "customer",
                       deposit: int = 0, **extra: object) -> str:
    """Open an account (and fund it); returns its id."""
    resp = await client.post("/v1/accounts", json={"currency": currency, "kind": kind, **extra})
    assert resp.status_code == 201, resp.text
    account_id: str = resp.json()["id"]
    if deposit:
        dep = await client.post(f"/v1/accounts/{account_id}/deposits", json={"amount": deposit})
        assert dep.status_code == 201, dep.text
    return account_id


@dataclass
class LedgerReport:
    """What the invariant check found; every list empty means the ledger is sound."""

    unbalanced_journals: list[tuple[object, ...]]
    balance_mismatches: list[tuple[object, ...]]
    negative_available: list[tuple[object, ...]]
    total_by_currency: dict[str, int]
    held_mismatches: list[tuple[object, ...]]

    def assert_sound(self) -> None:
        """Fail with the evidence if any invariant is broken."""
        assert self.unbalanced_journals == [], self.unbalanced_journals
        assert self.balance_mismatches == [], self.balance_mismatches
        assert self.negative_available == [], self.negative_available
        assert all(v == 0 for v in self.total_by_currency.values()), self.total_by_currency
        assert self.held_mismatches == [], self.held_mismatches


def check_ledger(db_url: str) -> LedgerReport:
    """Read the whole ledger and check double entry, balances, holds and conservation."""
    with psycopg.connect(db_url) as conn:
        unbalanced = conn.execute(
            "select journal_id, currency, sum(amount) from journal_entries "
            "group by journal_id, currency having sum(amount) <> 0").fetchall()
        mismatches = conn.execute(
            "select a.id, a.balance, coalesce(sum(e.amount), 0) from accounts a "
            "left join journal_entries e on e.account_id = a.id group by a.id "
            "having a.balance <> coalesce(sum(e.amount), 0)").fetchall()
        negative = conn.execute(
            "select id, balance, held from accounts "
            "where not allow_overdraft and balance - held < 0").fetchall()
        totals = dict(conn.execute(
            "select currency, sum(balance)::bigint from accounts group by currency").fetchall())
        held = conn.execute(
            "select a.id, a.held, coalesce(sum(p.amount_held), 0) from accounts a "
            "left join payments p on p.payer_id = a.id and p.status = 'requires_capture' "
            "group by a.id having a.held <> coalesce(sum(p.amount_held), 0)").fetchall()
    return LedgerReport(unbalanced, mismatches, negative, totals, held)
