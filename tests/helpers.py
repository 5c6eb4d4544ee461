"""Test helpers: opening funded accounts over the API and checking the ledger invariants
(docs/architecture.md, "Invariants") straight from the database."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest

from cluster.invariants import conflict_counts, ledger_findings


async def post_as_a_client_would(client: httpx.AsyncClient, path: str, body: dict[str, Any],
                                 key: str | None = None, within: float = 90.0) -> httpx.Response:
    """POST with an Idempotency-Key (`key`, or a new one), sent again with the same key
    (bounded by `within` seconds) after no answer, a 409 (our own retry raced the first
    attempt) or a 503 (a forwarding hop or a lease renewal late on a loaded machine). Such
    retries are what the key makes safe."""
    headers = {"Idempotency-Key": key or f"client-{uuid.uuid4()}"}
    deadline = time.monotonic() + within
    while True:
        try:
            resp = await client.post(path, json=body, headers=headers)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"{path} ({headers}) never answered"
            await asyncio.sleep(0.2)
            continue
        if resp.status_code in (409, 503) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            continue
        return resp


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
        totals: dict[str, int] = dict(conn.execute(
            "select currency, sum(balance)::bigint from accounts group by currency").fetchall())
        held = conn.execute(
            "select a.id, a.held, coalesce(sum(p.amount_held), 0) from accounts a "
            "left join payments p on p.payer_id = a.id and p.status = 'requires_capture' "
            "group by a.id having a.held <> coalesce(sum(p.amount_held), 0)").fetchall()
    return LedgerReport(unbalanced, mismatches, negative, totals, held)


def cluster_view(dsn: str) -> dict[str, Any]:
    """One region's copy of every account and payment, and how many are processing."""
    with psycopg.connect(dsn) as conn:
        accounts = conn.execute("select id, kind, balance, held, status from accounts "
                                "order by id").fetchall()
        payments = conn.execute("select id, status, amount, amount_captured, amount_refunded "
                                "from payments order by id").fetchall()
        processing = conn.execute("select count(*) from payments where status = 'processing'"
                                  ).fetchone()[0]  # type: ignore[index]
    return {"accounts": accounts, "payments": payments, "processing": processing}


def cluster_ledger_checks(dsn: str, deposits: int) -> None:
    """Invariants of one region's copy once the cluster is quiet (the drill's
    `cluster.invariants.ledger_findings`, every one must hold), plus what a test knows
    and a drill does not: exactly `deposits` came in, at least one subscription exists,
    and no apply errors."""
    failed = [f for f in ledger_findings("", dsn) if not f.ok]
    assert failed == [], failed
    counts = conflict_counts(dsn)
    assert counts and all(c == 0 and e == 0 for c, e in counts.values()), counts
    with psycopg.connect(dsn) as conn:
        by_kind: dict[str, int] = {str(k): int(v) for k, v in conn.execute(
            "select kind, sum(balance)::bigint from accounts group by kind").fetchall()}
    users = by_kind.get("customer", 0) + by_kind.get("merchant", 0)
    assert users + by_kind.get("clearing", 0) + by_kind.get("suspense", 0) == deposits, by_kind
    assert -by_kind.get("funding", 0) == deposits


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


async def until(check: Callable[[], Any], what: str, within: float = 30) -> None:
    """Poll `check` (a plain function) from async code until it is truthy."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
