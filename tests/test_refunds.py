"""Refunds of every payment, wherever its payer and payee live (issue 14).

Same home region: one transaction, the refund `succeeded` at once. Across regions: the
reverse saga (region_node/refunds.py) between two in-process nodes over real mutual-TLS
gRPC (`two_regions`, no replication: the push path), and on a real two-region lab for a
refund during a planned handover (replication and ownership move).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from cluster.servers import RegionServers
from region_node import refunds
from region_node.db import Database
from region_node.principals import Principal
from tests.conftest import two_regions
from tests.helpers import check_ledger, open_account

pytestmark = pytest.mark.integration


async def _wait(client: httpx.AsyncClient, path: str, status: str,
                within: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        resp = await client.get(path)
        body: dict[str, Any] = resp.json()
        if resp.status_code == 200 and body.get("status") == status:
            return body
        assert time.monotonic() < deadline, (path, resp.status_code, body)
        await asyncio.sleep(0.05)


def _one(dsn: str, sql: str, *args: object) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql, args).fetchone()
    return None if row is None else row[0]


def _events(dsn: str, aggregate: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [str(r[0]) for r in conn.execute(
            "select event_type from outbox where aggregate_id = %s order by id", (aggregate,))]


def _clearing(dsn: str) -> int:
    return int(_one(dsn, "select coalesce(sum(balance), 0) from accounts "
                         "where kind = 'clearing'"))


async def _balance(client: httpx.AsyncClient, account: str) -> int:
    body = (await client.get(f"/v1/accounts/{account}?consistency=strong")).json()
    return int(body["balance"])


async def _cross_payment(a: httpx.AsyncClient, b: httpx.AsyncClient, amount: int, *,
                         deposit: int) -> tuple[str, str, str]:
    """A payer homed in us-east (node a), a merchant in eu-west (node b), and a settled
    cross-region payment between them: (payer, payee, payment id)."""
    payer = await open_account(a, "EUR", deposit=deposit)
    payee = await open_account(b, "EUR", kind="merchant")
    created = await a.post("/v1/payments", json={"payer": payer, "payee": payee,
                                                  "amount": amount, "currency": "EUR"})
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    await _wait(a, f"/v1/payments/{pid}", "succeeded")
    return payer, payee, pid


async def _refund_until_answered(client: httpx.AsyncClient, pid: str, amount: int,
                                 key: str) -> httpx.Response:
    """Refund with an Idempotency-Key, retried as a client does while the answer is not a
    decision (503: the hop timed out on a loaded machine; 409 key in use: still running)."""
    deadline = time.monotonic() + 60
    while True:
        resp = await client.post(f"/v1/payments/{pid}/refunds", json={"amount": amount},
                                 headers={"Idempotency-Key": key})
        code = resp.json().get("error", {}).get("code") if resp.status_code >= 400 else None
        if resp.status_code != 503 and code != "idempotency_key_in_use":
            return resp
        assert time.monotonic() < deadline, resp.text
        await asyncio.sleep(0.2)


# ------------------------------------------------------------------ same home region

async def test_same_region_refunds_are_objects_that_succeed_at_once(
        client: httpx.AsyncClient, db_url: str) -> None:
    payer = await open_account(client, deposit=5_000)
    payee = await open_account(client, kind="merchant")
    pid = (await client.post("/v1/payments", json={"payer": payer, "payee": payee,
                                                   "amount": 1_000, "currency": "USD"})
           ).json()["id"]
    partial = await client.post(f"/v1/payments/{pid}/refunds", json={"amount": 300})
    assert partial.status_code == 201, partial.text
    body = partial.json()
    assert {k: body[k] for k in ("object", "payment_id", "amount", "currency", "status",
                                 "reason", "home_region")} == {
        "object": "refund", "payment_id": pid, "amount": 300, "currency": "USD",
        "status": "succeeded", "reason": None, "home_region": "us-east"}
    assert body["id"] and body["created_at"]
    rest = await client.post(f"/v1/payments/{pid}/refunds")
    assert rest.status_code == 201 and rest.json()["amount"] == 700, rest.text
    again = await client.post(f"/v1/payments/{pid}/refunds", json={"amount": 1})
    assert again.status_code == 409 and again.json()["error"]["code"] == "charge_already_refunded"

    assert (await client.get(f"/v1/refunds/{body['id']}")).json() == body
    listed = (await client.get(f"/v1/payments/{pid}/refunds")).json()
    assert [(r["amount"], r["status"]) for r in listed["data"]] == [(300, "succeeded"),
                                                                    (700, "succeeded")]
    assert (await client.get(f"/v1/payments/{pid}")).json()["amount_refunded"] == 1_000
    assert await _balance(client, payer) == 5_000 and await _balance(client, payee) == 0
    assert _events(db_url, body["id"]) == ["refund.succeeded"]
    assert _events(db_url, pid) == ["payment.succeeded", "payment.refunded", "payment.refunded"]
    check_ledger(db_url).assert_sound()


# ------------------------------------------------------------------ across regions

async def test_cross_region_partial_and_full_refunds(servers: RegionServers) -> None:
    async with two_regions(servers, grpc_deadline_seconds=20.0) as (a, b, db_a, db_b, _):
        payer, payee, pid = await _cross_payment(a, b, 2_000, deposit=10_000)
        # Sent to the payer's region: forwarded to the region serving the payee's home.
        first = await a.post(f"/v1/payments/{pid}/refunds", json={"amount": 500})
        assert first.status_code == 201, first.text
        assert first.headers["Paycluster-Served-By"] == "eu-west"
        refund = first.json()
        assert refund["status"] in ("pending", "succeeded") and refund["amount"] == 500
        assert refund["home_region"] == "eu-west" and refund["payee"] == payee
        done = await _wait(b, f"/v1/refunds/{refund['id']}", "succeeded")
        assert done["payer"] == payer, "the payer's region names the payer in its answer"
        # Read through the other region: not there, so asked of its owner.
        assert (await a.get(f"/v1/refunds/{refund['id']}")).json()["status"] == "succeeded"

        rest = await b.post(f"/v1/payments/{pid}/refunds")
        assert rest.status_code == 201 and rest.json()["amount"] == 1_500, rest.text
        await _wait(b, f"/v1/refunds/{rest.json()['id']}", "succeeded")
        more = await b.post(f"/v1/payments/{pid}/refunds", json={"amount": 1})
        assert more.status_code == 409, more.text
        assert more.json()["error"]["code"] == "charge_already_refunded"

        listed = (await b.get(f"/v1/payments/{pid}/refunds")).json()["data"]
        assert [(r["amount"], r["status"]) for r in listed] == [(500, "succeeded"),
                                                                (1_500, "succeeded")]
        assert await _balance(a, payer) == 10_000 and await _balance(b, payee) == 0
        # The payment row is written only by the payer's region, which counts the credits.
        payment = (await a.get(f"/v1/payments/{pid}")).json()
        assert (payment["status"], payment["amount_refunded"]) == ("succeeded", 2_000)
        assert _one(db_b, "select count(*) from payments") == 0, "never written at eu-west"
        assert _one(db_a, "select count(*) from refunds") == 0, "never written at us-east"
        assert _one(db_a, "select count(*) from refund_results where outcome = 'credited'") == 2
        # Nothing in transit once settled; each region's books balance.
        assert _clearing(db_a) + _clearing(db_b) == 0
        for db in (db_a, db_b):
            check_ledger(db).assert_sound()
        assert _events(db_b, refund["id"]) == ["refund.succeeded"]
        assert _events(db_a, pid) == ["payment.processing", "payment.succeeded",
                                      "payment.refunded", "payment.refunded"]


async def test_concurrent_partial_refunds_never_exceed_the_captured_amount(
        servers: RegionServers) -> None:
    async with two_regions(servers, grpc_deadline_seconds=20.0) as (a, b, db_a, db_b, _):
        payer, payee, pid = await _cross_payment(a, b, 2_000, deposit=5_000)
        # The merchant holds more than the payment: only the payment's limit can stop it.
        await b.post(f"/v1/accounts/{payee}/deposits", json={"amount": 10_000})
        answers = await asyncio.gather(*[
            _refund_until_answered(a if i % 2 else b, pid, 250, f"race-{i}")
            for i in range(12)])
        codes = sorted(r.status_code for r in answers)
        assert codes.count(201) == 8, [(r.status_code, r.text) for r in answers]
        assert all(r.status_code in (400, 409) for r in answers if r.status_code != 201)
        for r in answers:
            if r.status_code == 201:
                await _wait(b, f"/v1/refunds/{r.json()['id']}", "succeeded")
        assert _one(db_b, "select sum(amount) from refunds where payment_id = %s", pid) == 2_000
        assert (await a.get(f"/v1/payments/{pid}")).json()["amount_refunded"] == 2_000
        assert await _balance(a, payer) == 5_000
        assert await _balance(b, payee) == 10_000
        assert _clearing(db_a) + _clearing(db_b) == 0
        for db in (db_a, db_b):
            check_ledger(db).assert_sound()


async def test_concurrent_same_region_refunds_never_exceed_the_captured_amount(
        client: httpx.AsyncClient, db_url: str) -> None:
    payer = await open_account(client, deposit=5_000)
    payee = await open_account(client, kind="merchant", deposit=10_000)
    pid = (await client.post("/v1/payments", json={"payer": payer, "payee": payee,
                                                   "amount": 1_000, "currency": "USD"})
           ).json()["id"]
    answers = await asyncio.gather(*[
        client.post(f"/v1/payments/{pid}/refunds", json={"amount": 300}) for _ in range(8)])
    assert sorted(r.status_code for r in answers).count(201) == 3
    # 100 is left: exactly that, never more.
    assert (await client.post(f"/v1/payments/{pid}/refunds", json={"amount": 101})
            ).status_code == 400
    assert (await client.post(f"/v1/payments/{pid}/refunds")).json()["amount"] == 100
    assert (await client.get(f"/v1/payments/{pid}")).json()["amount_refunded"] == 1_000
    check_ledger(db_url).assert_sound()


async def test_refund_to_a_closed_payer_fails_and_recredits_the_merchant(
        servers: RegionServers) -> None:
    async with two_regions(servers, grpc_deadline_seconds=20.0) as (a, b, db_a, db_b, _):
        payer, payee, pid = await _cross_payment(a, b, 1_000, deposit=1_000)
        closed = await a.post(f"/v1/accounts/{payer}/close")
        assert closed.status_code == 200, closed.text
        resp = await b.post(f"/v1/payments/{pid}/refunds", json={"amount": 400})
        assert resp.status_code == 201, resp.text
        failed = await _wait(b, f"/v1/refunds/{resp.json()['id']}", "failed")
        assert failed["reason"] == "account_closed"
        # The merchant got its money back out of transit; the closed payer got nothing.
        assert await _balance(b, payee) == 1_000
        assert await _balance(a, payer) == 0
        assert (await a.get(f"/v1/payments/{pid}")).json()["amount_refunded"] == 0
        assert _one(db_a, "select reason from refund_results") == "account_closed"
        assert _events(db_b, failed["id"]) == ["refund.failed"]
        # A failed refund takes nothing from what may still be refunded.
        listed = (await b.get(f"/v1/payments/{pid}/refunds")).json()["data"]
        assert [(r["amount"], r["status"]) for r in listed] == [(400, "failed")]
        assert _clearing(db_a) + _clearing(db_b) == 0
        for db in (db_a, db_b):
            check_ledger(db).assert_sound()


async def test_retries_with_the_same_key_through_another_region(
        servers: RegionServers) -> None:
    async with two_regions(servers, grpc_deadline_seconds=20.0) as (a, b, db_a, db_b, _):
        payer, payee, pid = await _cross_payment(a, b, 900, deposit=900)
        headers = {"Idempotency-Key": "refund-retry-1"}
        first = await a.post(f"/v1/payments/{pid}/refunds", json={"amount": 600},
                             headers=headers)
        assert first.status_code == 201, first.text
        again = await b.post(f"/v1/payments/{pid}/refunds", json={"amount": 600},
                             headers=headers)
        assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
        other = await a.post(f"/v1/payments/{pid}/refunds", json={"amount": 100},
                             headers=headers)
        assert other.status_code == 422, other.text
        await _wait(b, f"/v1/refunds/{first.json()['id']}", "succeeded")
        assert _one(db_b, "select count(*) from refunds") == 1, "refunded once"
        assert await _balance(a, payer) == 600 and await _balance(b, payee) == 300
        assert _clearing(db_a) + _clearing(db_b) == 0


async def test_a_merchant_cannot_close_while_its_refund_is_in_transit(
        servers: RegionServers) -> None:
    async with two_regions(servers, grpc_deadline_seconds=20.0) as (a, b, _db_a, db_b, _):
        _, payee, pid = await _cross_payment(a, b, 700, deposit=700)
        # Started at eu-west's store without the push (and there is no replication here):
        # it stays pending, as when the payer's region is unreachable for a while.
        admin = Principal(id=uuid.uuid4(), name="admin", role="admin", key_id=uuid.uuid4(),
                          rate_per_second=None, rate_burst=None)
        db = Database(db_b)
        try:
            async def start(conn: AsyncConnection) -> Any:
                return await refunds.create(conn, region="eu-west", refund_id=uuid.uuid4(),
                                            payment_id=uuid.UUID(pid), amount=None,
                                            principal=admin, serving_home="eu-west")
            row = await db.transaction(start)
        finally:
            await db.dispose()
        assert (row.status, row.amount) == ("pending", 700)
        assert await _balance(b, payee) == 0
        # Its money may come back (compensation), so the empty account stays open.
        refused = await b.post(f"/v1/accounts/{payee}/close")
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "account_not_empty"
        assert "refund" in refused.json()["error"]["message"]
