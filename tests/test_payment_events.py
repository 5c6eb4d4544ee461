"""Every payment state change reaches the event consumer exactly once in effect: across a
node (and so relay) restart, and across a NATS outage during which payments still work."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from cluster.servers import start_nats
from region_node.config import RegionSettings
from tests.conftest import app_client
from tests.helpers import check_ledger, open_account

pytestmark = pytest.mark.integration

WAIT = 20.0


def _events(db_url: str) -> tuple[dict[str, str], dict[str, int], int]:
    """(outbox id -> event type, notifications event id -> deliveries, unpublished count)."""
    with psycopg.connect(db_url) as conn:
        outbox = dict(conn.execute("select id::text, event_type from outbox").fetchall())
        seen = dict(conn.execute("select event_id::text, deliveries from notifications")
                    .fetchall())
        backlog = conn.execute("select count(*) from outbox where published_at is null"
                               ).fetchone()[0]  # type: ignore[index]
    return outbox, seen, backlog


async def _wait_drained(db_url: str) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        outbox, seen, backlog = _events(db_url)
        if backlog == 0 and set(seen) == set(outbox):
            return
        assert time.monotonic() < deadline, (
            f"not drained: backlog {backlog}, {len(set(outbox) - set(seen))} unseen")
        await asyncio.sleep(0.1)


async def _workload(client: httpx.AsyncClient, payer: str, payee: str, n: int) -> list[str]:
    """Automatic, captured, canceled and refunded payments: every kind of state change."""
    ids = []
    for i in range(n):
        manual = i % 3 != 0
        resp = await client.post("/v1/payments", json={
            "payer": payer, "payee": payee, "amount": 10 + i, "currency": "USD",
            "capture_method": "manual" if manual else "automatic"})
        assert resp.status_code == 201, resp.text
        pid = resp.json()["id"]
        ids.append(pid)
        if manual and i % 2:
            assert (await client.post(f"/v1/payments/{pid}/capture")).status_code == 200
        elif manual:
            assert (await client.post(f"/v1/payments/{pid}/cancel")).status_code == 200
        if not manual:
            assert (await client.post(f"/v1/payments/{pid}/refunds",
                                      json={"amount": 5})).status_code == 201
    return ids


def _expected_types(db_url: str) -> dict[str, list[str]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("select aggregate_id::text, event_type from notifications "
                            "order by event_id").fetchall()
    out: dict[str, list[str]] = {}
    for agg, typ in rows:
        out.setdefault(agg, []).append(typ)
    return out


async def test_state_changes_reach_consumer_once_across_restart(
        settings: RegionSettings, db_url: str) -> None:
    fast = settings.model_copy(update={"outbox_poll_seconds": 0.05})
    async with app_client(fast) as client:
        payer = await open_account(client, deposit=100_000)
        payee = await open_account(client, kind="merchant")
        first = await _workload(client, payer, payee, 12)
    # The node (with its relay and consumer) stopped; events written before the stop may
    # be unpublished. A new node picks them up.
    async with app_client(fast) as client:
        second = await _workload(client, payer, payee, 12)
        await _wait_drained(db_url)
    _, seen, _ = _events(db_url)
    assert all(d == 1 for d in seen.values()), "JetStream dedupe keeps delivery effects single"
    by_payment = _expected_types(db_url)
    for i, pid in enumerate(first + second):
        manual = i % 12 % 3 != 0
        n = i % 12
        if not manual:
            assert by_payment[pid] == ["payment.succeeded", "payment.refunded"], by_payment[pid]
        elif n % 2:
            assert by_payment[pid] == ["payment.requires_capture", "payment.succeeded"]
        else:
            assert by_payment[pid] == ["payment.requires_capture", "payment.canceled"]


async def test_payments_survive_bus_outage(settings: RegionSettings, db_url: str,
                                           tmp_path: Path) -> None:
    nats_server = start_nats(tmp_path / "nats")
    port = nats_server.port
    try:
        own = settings.model_copy(update={"nats_url": nats_server.url,
                                          "outbox_poll_seconds": 0.05})
        async with app_client(own) as client:
            payer = await open_account(client, deposit=100_000)
            payee = await open_account(client, kind="merchant")
            await _workload(client, payer, payee, 3)
            await _wait_drained(db_url)

            nats_server.stop()
            during = await _workload(client, payer, payee, 9)
            _, _, backlog = _events(db_url)
            assert backlog >= len(during), "events wait in the outbox while the bus is down"
            ready = (await client.get("/health/ready")).json()
            assert ready["status"] == "degraded" and ready["checks"]["bus"] != "ok"

            nats_server = start_nats(tmp_path / "nats", port=port)
            await _wait_drained(db_url)
            deadline = time.monotonic() + WAIT
            while (await client.get("/health/ready")).json()["status"] != "ready":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        outbox, seen, backlog = _events(db_url)
        assert backlog == 0 and set(seen) == set(outbox)
        assert all(d == 1 for d in seen.values())
        check_ledger(db_url).assert_sound()
    finally:
        nats_server.stop()
