"""TCC barrier: duplicate confirm, cancel before try, try after cancel, hold expiry."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import ledger, tcc
from region_node.config import RegionSettings
from region_node.db import Database
from region_node.ids import new_id
from tests.conftest import app_client
from tests.helpers import check_ledger, open_account

pytestmark = pytest.mark.integration


async def _held(client: httpx.AsyncClient, account: str) -> int:
    held: int = (await client.get(f"/v1/accounts/{account}")).json()["held"]
    return held


async def test_duplicate_confirm_posts_once(client: httpx.AsyncClient, db_url: str) -> None:
    payer = await open_account(client, deposit=1_000)
    payee = await open_account(client, kind="merchant")
    resp = await client.post("/v1/payments", json={
        "payer": payer, "payee": payee, "amount": 400, "currency": "USD",
        "capture_method": "manual"})
    pid = resp.json()["id"]
    # Two captures race; the barrier and the row lock let exactly one post.
    first, second = await asyncio.gather(
        client.post(f"/v1/payments/{pid}/capture"), client.post(f"/v1/payments/{pid}/capture"))
    assert sorted([first.status_code, second.status_code]) == [200, 409]
    loser = first if first.status_code == 409 else second
    assert loser.json()["error"]["code"] == "payment_unexpected_state"
    # The barrier itself: a confirm replayed at the TCC layer is a recorded no-op.
    db = Database(db_url)
    ran: list[int] = []

    async def effect() -> None:
        ran.append(1)

    async def confirm(conn: AsyncConnection) -> tcc.Outcome:
        return await tcc.confirm_phase(conn, uuid.UUID(pid), "payer-hold", effect)

    assert await db.transaction(confirm) is tcc.Outcome.DUPLICATE
    await db.dispose()
    assert ran == []
    assert (await client.get(f"/v1/accounts/{payee}")).json()["balance"] == 400
    payer_view = (await client.get(f"/v1/accounts/{payer}")).json()
    assert (payer_view["balance"], payer_view["held"]) == (600, 0)
    check_ledger(db_url).assert_sound()


async def test_cancel_before_try_is_null_compensation_and_try_after_is_refused(
        client: httpx.AsyncClient, db_url: str) -> None:
    account = uuid.UUID(await open_account(client, deposit=1_000))
    db = Database(db_url)
    gid, branch = new_id(), "payer-hold"

    async def hold(conn: AsyncConnection) -> tcc.Outcome:
        async def effect() -> None:
            await ledger.change_hold(conn, account, 300)
        return await tcc.try_phase(conn, gid, branch, effect)

    async def release(conn: AsyncConnection) -> tcc.Outcome:
        async def effect() -> None:
            await ledger.change_hold(conn, account, -300)
        return await tcc.cancel_phase(conn, gid, branch, effect)

    try:
        # The cancel overtakes its try (a network reorder): nothing to release, recorded.
        assert await db.transaction(release) is tcc.Outcome.NULL_COMPENSATION
        assert await db.transaction(release) is tcc.Outcome.DUPLICATE
        # The late try must not hold money that nobody will ever release.
        with pytest.raises(tcc.HangingTry):
            await db.transaction(hold)
    finally:
        await db.dispose()
    assert await _held(client, str(account)) == 0
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("select op, reason from tcc_barrier where gid = %s order by op",
                            (gid,)).fetchall()
    assert rows == [("cancel", "cancel"), ("try", "cancel")]


async def test_duplicate_try_and_cancel_apply_once(client: httpx.AsyncClient, db_url: str) -> None:
    account = uuid.UUID(await open_account(client, deposit=1_000))
    db = Database(db_url)
    gid = new_id()

    async def hold(conn: AsyncConnection) -> tcc.Outcome:
        async def effect() -> None:
            await ledger.change_hold(conn, account, 250)
        return await tcc.try_phase(conn, gid, "b", effect)

    async def release(conn: AsyncConnection) -> tcc.Outcome:
        async def effect() -> None:
            await ledger.change_hold(conn, account, -250)
        return await tcc.cancel_phase(conn, gid, "b", effect)

    try:
        outcomes = await asyncio.gather(*(db.transaction(hold) for _ in range(5)))
        assert sorted(outcomes) == sorted([tcc.Outcome.APPLIED] + [tcc.Outcome.DUPLICATE] * 4)
        assert await _held(client, str(account)) == 250
        outcomes = await asyncio.gather(*(db.transaction(release) for _ in range(5)))
        assert outcomes.count(tcc.Outcome.APPLIED) == 1
        assert await _held(client, str(account)) == 0
    finally:
        await db.dispose()


async def test_hold_expiry_releases_funds(settings: RegionSettings, db_url: str) -> None:
    short = settings.model_copy(update={"hold_ttl_seconds": 0.5,
                                        "hold_expiry_poll_seconds": 0.1})
    async with app_client(short) as client:
        payer = await open_account(client, deposit=1_000)
        payee = await open_account(client, kind="merchant")
        resp = await client.post("/v1/payments", json={
            "payer": payer, "payee": payee, "amount": 700, "currency": "USD",
            "capture_method": "manual"})
        pid = resp.json()["id"]
        assert (await client.get(f"/v1/accounts/{payer}")).json()["available"] == 300
        deadline = asyncio.get_running_loop().time() + 10
        while (await client.get(f"/v1/payments/{pid}")).json()["status"] != "canceled":
            assert asyncio.get_running_loop().time() < deadline, "hold never expired"
            await asyncio.sleep(0.1)
        payment = (await client.get(f"/v1/payments/{pid}")).json()
        assert payment["failure_code"] == "expired" and payment["amount_capturable"] == 0
        view = (await client.get(f"/v1/accounts/{payer}")).json()
        assert (view["balance"], view["held"], view["available"]) == (1_000, 0, 1_000)
        late = await client.post(f"/v1/payments/{pid}/capture")
        assert late.status_code == 409
    check_ledger(db_url).assert_sound()
