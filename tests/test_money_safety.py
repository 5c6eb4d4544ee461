"""Ways money could be created or charged twice, each closed and held by a test that fails
on the code that had the hole (issue 12):

- a customer opening an account that may overdraw, then withdrawing money never deposited;
- a rejected partial capture of a cross-region payment refunding the whole authorisation;
- an idempotency claim taken over while the original still runs: both commit;
- credits to closed accounts (deposit, capture, refund, and a saga reversal to a payer
  that closed while its payment was in transit);
- idempotency keys shared across tenants (scoped per caller now);
- a TCC cancel that never looks for the confirm; holds on the application's clock.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

import httpx
import psycopg
import pytest
import sqlalchemy as sa

from cluster.servers import RegionServers
from region_node import tcc
from region_node.config import RegionSettings
from region_node.db import Database
from region_node.errors import Conflict
from region_node.idempotency import Claim, ClaimLost, IdempotencyStore, StoredResponse
from tests.conftest import app_client, auth_headers, two_regions
from tests.helpers import check_ledger, open_account
from tests.test_auth import account_of, as_key, new_principal, node

pytestmark = pytest.mark.integration


def _balance(db_url: str, account: str) -> tuple[int, int]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select balance, held from accounts where id = %s",
                           (account,)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _count(db_url: str, sql: str, *args: object) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(sql, args).fetchone()
    return int(row[0]) if row else 0


async def _status(client: httpx.AsyncClient, pid: str, want: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while True:
        body: dict[str, object] = (await client.get(f"/v1/payments/{pid}")).json()
        if body["status"] == want:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- 1. overdraft accounts

async def test_only_an_admin_opens_an_overdraft_account(settings: RegionSettings,
                                                         db_url: str) -> None:
    async with node(settings) as client:
        _, _, key = await new_principal(client, "mallory")
        before = _count(db_url, "select count(*) from accounts")
        refused = await client.post("/v1/accounts", headers=as_key(key), json={
            "currency": "USD", "allow_overdraft": True})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["type"] == "permission_error"
        assert refused.json()["error"]["param"] == "allow_overdraft"
        assert _count(db_url, "select count(*) from accounts") == before, "nothing written"

        # Her ordinary account cannot pay out what was never deposited.
        own = await account_of(client, key)
        withdrawal = await client.post(f"/v1/accounts/{own}/withdrawals", headers=as_key(key),
                                       json={"amount": 1_000_000_000})
        assert withdrawal.status_code == 402, withdrawal.text
        assert _balance(db_url, own) == (0, 0)

        # An admin's overdraft account pays within the ledger, but a withdrawal (money
        # leaving the ledger) never takes it below zero.
        granted = await client.post("/v1/accounts", headers=auth_headers(), json={
            "currency": "USD", "allow_overdraft": True})
        assert granted.status_code == 201 and granted.json()["allow_overdraft"] is True
        credit = granted.json()["id"]
        out = await client.post(f"/v1/accounts/{credit}/withdrawals", headers=auth_headers(),
                                json={"amount": 500})
        assert out.status_code == 402, out.text
    check_ledger(db_url).assert_sound()


# ---------------------------------------------- 2. rejected partial capture, cross region

async def test_rejected_partial_capture_returns_only_what_was_captured(
        servers: RegionServers) -> None:
    async with two_regions(servers) as (a, b, db_a, _db_b, _):
        payer = await open_account(a, deposit=10_000)
        merchant = (await b.post("/v1/accounts", json={"currency": "USD",
                                                       "kind": "merchant"})).json()["id"]
        held = await a.post("/v1/payments", json={
            "payer": payer, "payee": merchant, "amount": 10_000, "currency": "USD",
            "capture_method": "manual"})
        assert held.status_code == 201, held.text
        pid = held.json()["id"]
        closed = await b.post(f"/v1/accounts/{merchant}/close")
        assert closed.status_code == 200, closed.text
        captured = await a.post(f"/v1/payments/{pid}/capture", json={"amount": 1})
        assert captured.status_code == 200, captured.text
        await _status(a, pid, "failed")
        account = (await a.get(f"/v1/accounts/{payer}")).json()
        assert (account["balance"], account["available"], account["held"]) == (10_000, 10_000, 0)
        with psycopg.connect(db_a) as conn:
            clearing = conn.execute("select coalesce(sum(balance), 0) from accounts "
                                    "where kind = 'clearing'").fetchone()
        assert clearing == (0,), "nothing left in transit"
        check_ledger(db_a).assert_sound()


# ------------------------------------------------------- 3. one executor per claim

async def test_retry_while_the_original_is_blocked_never_charges_twice(
        settings: RegionSettings, db_url: str) -> None:
    """The original request is stuck behind a row lock longer than the claim's lock time;
    a retry with the same key must not run the payment a second time."""
    short = settings.model_copy(update={"idempotency_lock_seconds": 0.3})
    async with app_client(short) as client:
        payer = await open_account(client, deposit=10_000)
        payee = await open_account(client, kind="merchant")
        body = {"payer": payer, "payee": payee, "amount": 700, "currency": "USD"}
        key = {"Idempotency-Key": f"stuck-{uuid.uuid4()}"}
        with psycopg.connect(db_url) as blocker:
            blocker.execute("select 1 from accounts where id = %s for update", (payer,))
            first = asyncio.create_task(client.post("/v1/payments", json=body, headers=key))
            deadline = time.monotonic() + 30
            while _count(db_url, "select count(*) from pg_stat_activity where "
                                 "wait_event_type = 'Lock' and datname = current_database()"
                         ) == 0:
                assert time.monotonic() < deadline, "the first request never blocked"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # past the claim's lock time: a takeover was allowed
            retry = await client.post("/v1/payments", json=body, headers=key)
            assert retry.status_code == 409, retry.text
            assert retry.json()["error"]["code"] == "idempotency_key_in_use"
            blocker.rollback()
        original = await first
        assert original.status_code == 201, original.text
        replay = await client.post("/v1/payments", json=body, headers=key)
        assert replay.status_code == 201 and replay.json()["id"] == original.json()["id"]
    assert _count(db_url, "select count(*) from payments") == 1
    assert _balance(db_url, payer) == (9_300, 0)


async def test_a_stalled_claim_taken_over_can_no_longer_commit(db_url: str) -> None:
    """The original stalled before its effect transaction (waiting for a connection) and a
    retry took its claim over: the original's effect transaction is refused."""
    db = Database(db_url)
    store = IdempotencyStore(db, None, ttl_seconds=3600, lock_seconds=0.05)
    try:
        original = await store.claim("us-east", f"p/{uuid.uuid4()}", "h")
        assert isinstance(original, Claim)
        await asyncio.sleep(0.1)
        taker = await store.claim(original.scope, original.key, "h")
        assert isinstance(taker, Claim) and taker.token != original.token

        async def effect(claim: Claim) -> None:
            async def step(conn: sa.ext.asyncio.AsyncConnection) -> None:
                await store.hold(conn, claim)
                await conn.execute(sa.text("create temporary table effect_ran (x int)"))
                await store.finish(conn, claim, 201, {"id": str(claim.token)})
            await db.transaction(step)

        with pytest.raises(ClaimLost):
            await effect(original)
        await effect(taker)
        with pytest.raises(ClaimLost) as lost:
            await effect(original)
        assert lost.value.stored == StoredResponse(201, {"id": str(taker.token)})
        replay = await store.claim(original.scope, original.key, "h")
        assert replay == StoredResponse(201, {"id": str(taker.token)})
        # The loser's release leaves the winner's row alone.
        await store.release(original)
        assert await store.claim(original.scope, original.key, "h") == replay
    finally:
        await db.dispose()


# ------------------------------------------------------------- 5. closed accounts

async def test_closed_accounts_receive_nothing(client: httpx.AsyncClient, db_url: str) -> None:
    payer = await open_account(client, deposit=5_000)
    merchant = await open_account(client, kind="merchant")
    hold = await client.post("/v1/payments", json={
        "payer": payer, "payee": merchant, "amount": 1_000, "currency": "USD",
        "capture_method": "manual"})
    assert hold.status_code == 201, hold.text
    assert (await client.post(f"/v1/accounts/{merchant}/close")).status_code == 200

    deposit = await client.post(f"/v1/accounts/{merchant}/deposits", json={"amount": 10})
    assert deposit.status_code == 400 and deposit.json()["error"]["code"] == "account_closed"
    capture = await client.post(f"/v1/payments/{hold.json()['id']}/capture")
    assert capture.status_code == 400 and capture.json()["error"]["code"] == "account_closed"
    assert _balance(db_url, merchant) == (0, 0)
    assert _balance(db_url, payer) == (5_000, 1_000), "the hold stays until canceled"
    assert (await client.post(f"/v1/payments/{hold.json()['id']}/cancel")).status_code == 200

    # A payer who spent everything and closed gets no refund credited to a closed account.
    shop = await open_account(client, kind="merchant")
    paid = await client.post("/v1/payments", json={
        "payer": payer, "payee": shop, "amount": 5_000, "currency": "USD"})
    assert paid.status_code == 201
    assert (await client.post(f"/v1/accounts/{payer}/close")).status_code == 200
    refund = await client.post(f"/v1/payments/{paid.json()['id']}/refunds",
                               json={"amount": 100})
    assert refund.status_code == 400 and refund.json()["error"]["code"] == "account_closed"
    assert _balance(db_url, payer) == (0, 0) and _balance(db_url, shop) == (5_000, 0)
    check_ledger(db_url).assert_sound()


async def test_a_payer_cannot_close_while_its_payment_is_in_transit(
        servers: RegionServers) -> None:
    """If the payee's region then rejected the payment, the reversal would credit a closed
    account: closing waits until the payment has settled."""
    async with two_regions(servers) as (a, b, db_a, db_b, _):
        payer = await open_account(a, deposit=2_000)
        payee = (await b.post("/v1/accounts", json={"currency": "USD",
                                                    "kind": "merchant"})).json()["id"]
        with psycopg.connect(db_b) as blocker:
            # The payee's region cannot credit yet: the payment stays in transit.
            blocker.execute("select 1 from accounts where id = %s for update", (payee,))
            paid = await a.post("/v1/payments", json={
                "payer": payer, "payee": payee, "amount": 2_000, "currency": "USD"})
            assert paid.status_code == 201 and paid.json()["status"] == "processing"
            close = await a.post(f"/v1/accounts/{payer}/close")
            assert close.status_code == 409, close.text
            assert close.json()["error"]["code"] == "account_not_empty"
            blocker.rollback()
        await _status(a, paid.json()["id"], "succeeded")
        assert (await a.post(f"/v1/accounts/{payer}/close")).status_code == 200
        check_ledger(db_a).assert_sound()


# ------------------------------------------------------- 6. keys scoped per caller

async def test_two_tenants_may_use_the_same_key(settings: RegionSettings, db_url: str) -> None:
    async with node(settings) as client:
        _, _, alice = await new_principal(client, "alice")
        _, _, bob = await new_principal(client, "bob")
        shop = (await client.post("/v1/accounts", headers=auth_headers(), json={
            "currency": "USD", "kind": "merchant"})).json()["id"]
        alice_acc = await account_of(client, alice, deposit=1_000)
        bob_acc = await account_of(client, bob, deposit=1_000)
        paid = {}
        for who, key, acc in (("alice", alice, alice_acc), ("bob", bob, bob_acc)):
            resp = await client.post("/v1/payments", headers={
                **as_key(key), "Idempotency-Key": "order-1"}, json={
                "payer": acc, "payee": shop, "amount": 250, "currency": "USD"})
            assert resp.status_code == 201, (who, resp.text)
            assert "Idempotent-Replayed" not in resp.headers
            paid[who] = resp.json()["id"]
        assert paid["alice"] != paid["bob"]
        # Each replays only their own.
        again = await client.post("/v1/payments", headers={
            **as_key(bob), "Idempotency-Key": "order-1"}, json={
            "payer": bob_acc, "payee": shop, "amount": 250, "currency": "USD"})
        assert again.json()["id"] == paid["bob"] and again.headers["Idempotent-Replayed"]
    assert _balance(db_url, shop) == (500, 0)


# -------------------------------------------------------------------- 10. TCC, clock

async def test_cancel_after_confirm_is_refused_by_the_barrier(db_url: str) -> None:
    db = Database(db_url)
    gid = uuid.uuid4()
    ran: list[str] = []

    async def effect_of(name: str) -> tcc.Effect:
        async def effect() -> None:
            ran.append(name)
        return effect

    try:
        async def confirm(conn: sa.ext.asyncio.AsyncConnection) -> None:
            await tcc.try_phase(conn, gid, "b", await effect_of("try"))
            await tcc.confirm_phase(conn, gid, "b", await effect_of("confirm"))
        await db.transaction(confirm)

        async def cancel(conn: sa.ext.asyncio.AsyncConnection) -> None:
            await tcc.cancel_phase(conn, gid, "b", await effect_of("cancel"))
        with pytest.raises(Conflict) as refused:
            await db.transaction(cancel)
        assert refused.value.code == "tcc_cancel_after_confirm"
        assert ran == ["try", "confirm"], "the release never ran after the confirm"
    finally:
        await db.dispose()


async def test_holds_expire_on_the_database_clock(settings: RegionSettings,
                                                  db_url: str) -> None:
    ttl = timedelta(minutes=10)
    async with app_client(settings.model_copy(
            update={"hold_ttl_seconds": ttl.total_seconds()})) as client:
        payer = await open_account(client, deposit=1_000)
        payee = await open_account(client, kind="merchant")
        hold = await client.post("/v1/payments", json={
            "payer": payer, "payee": payee, "amount": 100, "currency": "USD",
            "capture_method": "manual"})
        assert hold.status_code == 201
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select hold_expires_at - created_at from payments where id = %s",
                           (hold.json()["id"],)).fetchone()
    # Both stamped by the database in the same transaction: exactly the ttl apart.
    assert row == (ttl,)
