"""Idempotency keys: replay, 422 on a different body, 409 while in flight, 24 h expiry,
and 20 concurrent requests with one key making exactly one payment."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import psycopg
import pytest

from region_node.config import RegionSettings
from tests.conftest import app_client
from tests.helpers import check_ledger, open_account

pytestmark = pytest.mark.integration


async def _pair(client: httpx.AsyncClient) -> tuple[str, str]:
    return (await open_account(client, deposit=10_000),
            await open_account(client, kind="merchant"))


def _payment_count(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        count: int = conn.execute("select count(*) from payments").fetchone()[0]  # type: ignore[index]
    return count


async def test_same_key_same_body_replays(client: httpx.AsyncClient, db_url: str,
                                          servers: object) -> None:
    payer, payee = await _pair(client)
    body = {"payer": payer, "payee": payee, "amount": 500, "currency": "USD"}
    headers = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    first = await client.post("/v1/payments", json=body, headers=headers)
    # Key order differs: still the same request.
    second = await client.post("/v1/payments", json=dict(reversed(body.items())), headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert _payment_count(db_url) == 1
    assert (await client.get(f"/v1/accounts/{payer}")).json()["balance"] == 9_500


async def test_replay_survives_losing_redis(client: httpx.AsyncClient, db_url: str,
                                            settings: RegionSettings) -> None:
    payer, payee = await _pair(client)
    body = {"payer": payer, "payee": payee, "amount": 300, "currency": "USD"}
    key = f"k-{uuid.uuid4()}"
    first = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
    import redis
    redis.Redis.from_url(settings.redis_url).flushall()  # the fast path is gone
    again = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 201 and again.json() == first.json()
    assert _payment_count(db_url) == 1


async def test_errors_are_replayed_too(client: httpx.AsyncClient) -> None:
    payer, payee = await _pair(client)
    body = {"payer": payer, "payee": payee, "amount": 50_000, "currency": "USD"}
    headers = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    first = await client.post("/v1/payments", json=body, headers=headers)
    assert first.status_code == 402
    await client.post(f"/v1/accounts/{payer}/deposits", json={"amount": 100_000})
    # Stripe semantics: the key's answer is fixed, even though funds now suffice.
    second = await client.post("/v1/payments", json=body, headers=headers)
    assert second.status_code == 402 and second.json() == first.json()


async def test_same_key_different_body_is_422(client: httpx.AsyncClient, db_url: str) -> None:
    payer, payee = await _pair(client)
    headers = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    ok = await client.post("/v1/payments", headers=headers, json={
        "payer": payer, "payee": payee, "amount": 100, "currency": "USD"})
    assert ok.status_code == 201
    other = await client.post("/v1/payments", headers=headers, json={
        "payer": payer, "payee": payee, "amount": 101, "currency": "USD"})
    assert other.status_code == 422
    assert other.json()["error"]["type"] == "idempotency_error"
    assert _payment_count(db_url) == 1


async def test_same_key_in_flight_is_409(client: httpx.AsyncClient, db_url: str) -> None:
    payer, payee = await _pair(client)
    key = f"k-{uuid.uuid4()}"
    body = {"payer": payer, "payee": payee, "amount": 100, "currency": "USD"}
    # Hold the payer's row so the first request stays in flight while the second arrives.
    with psycopg.connect(db_url) as blocker:
        blocker.execute("select 1 from accounts where id = %s for update", (payer,))
        first = asyncio.create_task(
            client.post("/v1/payments", json=body, headers={"Idempotency-Key": key}))
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # wait until the first request has claimed the key
            with psycopg.connect(db_url) as probe:
                if probe.execute("select 1 from idempotency_keys where key like %s",
                                 (f"%/{key}",)).fetchone():
                    break
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        second = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "idempotency_key_in_use"
        blocker.rollback()
    assert (await first).status_code == 201
    third = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
    assert third.status_code == 201 and third.json() == (await first).json()
    assert _payment_count(db_url) == 1


async def test_twenty_concurrent_requests_one_payment(client: httpx.AsyncClient,
                                                      db_url: str) -> None:
    payer, payee = await _pair(client)
    key = f"k-{uuid.uuid4()}"
    body = {"payer": payer, "payee": payee, "amount": 700, "currency": "USD"}
    responses = await asyncio.gather(*(
        client.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
        for _ in range(20)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {201, 409}, codes
    created = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(created) == 1, "every success is the same payment"
    assert _payment_count(db_url) == 1
    assert (await client.get(f"/v1/accounts/{payer}")).json()["balance"] == 9_300
    check_ledger(db_url).assert_sound()


async def test_keys_expire_after_ttl(settings: RegionSettings, db_url: str) -> None:
    short = settings.model_copy(update={"idempotency_ttl_seconds": 1.0})
    async with app_client(short) as client:
        payer, payee = await _pair(client)
        key = f"k-{uuid.uuid4()}"
        body = {"payer": payer, "payee": payee, "amount": 100, "currency": "USD"}
        first = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
        await asyncio.sleep(1.2)
        later = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
        assert later.status_code == 201 and later.json()["id"] != first.json()["id"]
        await asyncio.sleep(1.2)
        from region_node.janitor import KeyJanitor
        node = client._transport.app.state.node  # type: ignore[attr-defined]
        assert await KeyJanitor(node).run_once() >= 1
    assert _payment_count(db_url) == 2
    with psycopg.connect(db_url) as conn:
        assert conn.execute("select count(*) from idempotency_keys where key like %s",
                            (f"%/{key}",)).fetchone() == (0,), "the janitor forgot the expired key"


async def test_abandoned_claim_can_be_retried(settings: RegionSettings, db_url: str) -> None:
    """A node that died after claiming a key (nothing committed) does not block the key
    forever: after the lock timeout a retry runs the request. The claim's age is set in
    the store (just now, then older than the timeout), so no race with the clock."""
    lock_seconds = 30.0
    short = settings.model_copy(update={"idempotency_lock_seconds": lock_seconds})
    async with app_client(short) as client:
        payer, payee = await _pair(client)
        key = f"k-{uuid.uuid4()}"
        body = {"payer": payer, "payee": payee, "amount": 100, "currency": "USD"}
        import json

        from region_node.idempotency import caller_key, request_hash
        from tests.conftest import ADMIN
        # Keys are the caller's own (the admin key of the test client).
        req_hash = request_hash("POST", "/v1/payments", json.dumps(body).encode())
        stored_key = caller_key(ADMIN[0].principal_id, key)
        with psycopg.connect(db_url) as conn:
            conn.execute(
                "insert into idempotency_keys (scope, key, request_hash, state, locked_at, "
                "expires_at, token) values ('us-east', %s, %s, 'started', now(), "
                "now() + interval '1 day', gen_random_uuid())", (stored_key, req_hash))
        busy = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
        assert busy.status_code == 409
        assert busy.json()["error"]["code"] == "idempotency_key_in_use"
        assert _payment_count(db_url) == 0
        with psycopg.connect(db_url) as conn:  # the claim is now older than the lock timeout
            conn.execute("update idempotency_keys set locked_at = now() - make_interval("
                         "secs => %s) where key = %s", (lock_seconds + 1, stored_key))
        retry = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
        assert retry.status_code == 201, retry.text
    assert _payment_count(db_url) == 1
