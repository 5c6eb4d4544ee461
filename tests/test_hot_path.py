"""The payment hot path (region_node/hot_path.py, SQL function pay_local): the same
answers, rows and refusals as the general path, in one call."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import psycopg
import pytest

from region_node.config import RegionSettings
from tests.conftest import app_client
from tests.helpers import check_ledger, open_account

pytestmark = pytest.mark.integration


@pytest.fixture
async def general(settings: RegionSettings) -> AsyncIterator[httpx.AsyncClient]:
    """A node of the same database with the hot path off: the reference behaviour."""
    async with app_client(settings.model_copy(update={"hot_path": False})) as c:
        yield c


def _payments(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select count(*) from payments").fetchone()
    return int(row[0]) if row else 0


def _norm(body: dict[str, Any]) -> dict[str, Any]:
    """A body without the values that differ between two payments."""
    return {k: (type(v).__name__ if k in ("id", "created_at", "updated_at") else v)
            for k, v in body.items()}


async def test_same_bytes_as_the_general_path(client: httpx.AsyncClient,
                                              general: httpx.AsyncClient, db_url: str) -> None:
    payer = await open_account(client, deposit=10_000)
    payee = await open_account(client, kind="merchant")
    body = {"payer": payer, "payee": payee, "amount": 250, "currency": "USD",
            "description": "coffee"}
    fast = await client.post("/v1/payments", json=body,
                             headers={"Idempotency-Key": f"k-{uuid.uuid4()}"})
    slow = await general.post("/v1/payments", json=body,
                              headers={"Idempotency-Key": f"k-{uuid.uuid4()}"})
    assert fast.status_code == slow.status_code == 201
    assert list(fast.json()) == list(slow.json()), "same keys in the same order"
    assert _norm(fast.json()) == _norm(slow.json())
    # The stored row, read back through payment_view.to_api, serializes to the same bytes
    # (timestamps formatted as Python's isoformat does).
    again = await general.get(f"/v1/payments/{fast.json()['id']}")
    assert again.content == fast.content
    with psycopg.connect(db_url) as conn:
        pid = fast.json()["id"]
        assert conn.execute("select epoch is not distinct from (select max(epoch) from "
                            "ownership_epochs where home_region = 'us-east') from payments "
                            "where id = %s", (pid,)).fetchone() == (True,)
        assert conn.execute("select count(*), sum(amount) from journal_entries "
                            "where payment_id = %s", (pid,)).fetchone() == (2, 0)
        event = conn.execute("select event_type, payload->'data' from outbox "
                             "where aggregate_id = %s", (pid,)).fetchone()
        assert event is not None and event[0] == "payment.succeeded"
        assert event[1] == fast.json()
        audit = conn.execute("select action, resource, status from audit_log "
                             "where resource = %s", (pid,)).fetchall()
        assert audit == [("payments.create", pid, 201)], "one audit row, in the transaction"
    check_ledger(db_url).assert_sound()


@pytest.mark.parametrize("case", ["funds", "currency", "payee_missing", "closed", "kind"])
async def test_refusals_match_the_general_path(client: httpx.AsyncClient,
                                               general: httpx.AsyncClient, db_url: str,
                                               case: str) -> None:
    async def scenario(c: httpx.AsyncClient) -> dict[str, Any]:
        payer = await open_account(c, deposit=100)
        payee = await open_account(c, kind="merchant", currency="EUR" if case == "currency"
                                   else "USD")
        if case == "closed":
            assert (await c.post(f"/v1/accounts/{payee}/close")).status_code == 200
        if case == "payee_missing":
            payee = payee[:-4] + ("0000" if not payee.endswith("0000") else "1111")
        body: dict[str, Any] = {"payer": payer, "payee": payee, "currency": "USD",
                                "amount": 500 if case == "funds" else 50}
        if case == "kind":
            # The region's funding account (exists once anything was deposited).
            with psycopg.connect(db_url) as conn:
                row = conn.execute("select id from accounts where kind = 'funding' "
                                   "and currency = 'USD'").fetchone()
            assert row is not None
            body["payee"] = str(row[0])
        return {"payer": payer, "body": body}

    def strip(resp: httpx.Response, ids: Callable[[str], str]) -> tuple[int, dict[str, Any]]:
        return resp.status_code, {k: ids(v) for k, v in resp.json()["error"].items()}

    answers = []
    for c in (client, general):
        made = await scenario(c)
        key = f"k-{uuid.uuid4()}"
        first = await c.post("/v1/payments", json=made["body"], headers={"Idempotency-Key": key})
        replay = await c.post("/v1/payments", json=made["body"],
                              headers={"Idempotency-Key": key})
        assert replay.status_code == first.status_code and replay.json() == first.json()
        b = made["body"]
        answers.append(strip(first, lambda v, b=b: str(v).replace(b["payer"], "<payer>")
                             .replace(b["payee"], "<payee>")))
    assert answers[0] == answers[1]
    assert answers[0][0] in (400, 402, 404)
    check_ledger(db_url).assert_sound()


async def test_forbidden_payer(client: httpx.AsyncClient, db_url: str,
                               settings: RegionSettings) -> None:
    """Another principal's payer: 403, nothing moves (access.require_account)."""
    payer = await open_account(client, deposit=1_000)
    payee = await open_account(client, kind="merchant")
    created = await client.post("/v1/admin/principals",
                                json={"name": f"t-{uuid.uuid4()}", "role": "customer"})
    assert created.status_code == 201, created.text
    key = created.json()["api_key"]["key"]
    async with app_client(settings, key=key) as other:
        resp = await other.post("/v1/payments", json={
            "payer": payer, "payee": payee, "amount": 10, "currency": "USD"},
            headers={"Idempotency-Key": f"k-{uuid.uuid4()}"})
    assert resp.status_code == 403
    assert resp.json()["error"]["message"] == "This API key may not access this payer account"
    assert _payments(db_url) == 0


async def test_group_commit_gives_each_payment_its_own_answer(client: httpx.AsyncClient,
                                                              db_url: str) -> None:
    """A burst is committed in batches (pay_batch); a refusal, a duplicate key and a
    payer locked elsewhere (its batch falls back to the general path) never change the
    answers of their batch-mates."""
    pairs = [(await open_account(client, deposit=1_000),
              await open_account(client, kind="merchant")) for _ in range(12)]
    broke = await open_account(client, deposit=10)
    shared_key = f"k-{uuid.uuid4()}"

    def body(i: int) -> dict[str, Any]:
        payer, payee = pairs[i % len(pairs)]
        return {"payer": payer, "payee": payee, "amount": 10, "currency": "USD"}

    async def pay(b: dict[str, Any], key: str) -> httpx.Response:
        return await client.post("/v1/payments", json=b, headers={"Idempotency-Key": key})

    node = client._transport.app.state.node  # type: ignore[attr-defined]
    before = (node.hot_path.batches, node.hot_path.payments)
    with psycopg.connect(db_url) as blocker:
        # Held for 1.5 s: longer than the hot path's lock timeout (1 s).
        blocker.execute("select 1 from accounts where id = %s for update", (pairs[0][0],))
        tasks = [pay(body(i), f"k-{uuid.uuid4()}") for i in range(48)]
        tasks += [pay(body(1), shared_key), pay(body(1), shared_key)]
        tasks.append(pay({**body(2), "payer": broke, "amount": 500}, f"k-{uuid.uuid4()}"))
        running = [asyncio.ensure_future(t) for t in tasks]
        await asyncio.sleep(1.5)
        blocker.rollback()
    answers = await asyncio.gather(*running)
    plain, dupes, refused = answers[:48], answers[48:50], answers[50]
    assert [r.status_code for r in plain] == [201] * 48, [r.text for r in plain
                                                         if r.status_code != 201]
    assert len({r.json()["id"] for r in plain}) == 48
    assert {r.status_code for r in dupes} <= {201, 409}
    assert len({r.json()["id"] for r in dupes if r.status_code == 201}) == 1
    assert refused.status_code == 402
    batches, payments = (node.hot_path.batches - before[0], node.hot_path.payments - before[1])
    assert payments > batches, "the burst was committed in batches, not one by one"
    with psycopg.connect(db_url) as conn:
        count = conn.execute("select count(*) from payments").fetchone()
    assert count == (49,)
    check_ledger(db_url).assert_sound()
