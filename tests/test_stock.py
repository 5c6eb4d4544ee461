"""Global stock in one region: SKUs, orders that reserve and pay in one transaction, sold
out exactly, compensation when the payment is refused, and bad input."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import psycopg
import pytest

from lock_service.quorum import LockService
from region_node.config import RegionSettings
from tests.helpers import check_ledger, open_account

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
async def _lock_ready(settings: RegionSettings) -> None:
    """The session's Redis is new to the lock service (or was flushed by another test):
    mark it ready instead of sitting out the quarantine a restarted Redis needs."""
    service = LockService([settings.redis_url])
    try:
        await service.provision_new_servers()
    finally:
        await service.aclose()


async def _order(client: httpx.AsyncClient, sku: str, qty: int, payer: str, payee: str,
                 amount: int = 100) -> httpx.Response:
    return await client.post("/v1/orders", json={
        "sku": sku, "quantity": qty, "payer": payer, "payee": payee, "amount": amount,
        "currency": "USD"})


async def test_sell_out_exactly(client: httpx.AsyncClient, db_url: str) -> None:
    created = await client.post("/v1/skus", json={"sku": "ticket-a", "stock": 10})
    assert created.status_code == 201, created.text
    assert created.json()["allotments"]["us-east"]["allotted"] == 10
    payer = await open_account(client, deposit=100_000)
    merchant = await open_account(client, kind="merchant")
    for _ in range(3):
        resp = await _order(client, "ticket-a", 3, payer, merchant)
        assert resp.status_code == 201, resp.text
        assert resp.json()["status"] == "confirmed"
        assert resp.json()["payment"]["status"] == "succeeded"
    short = await _order(client, "ticket-a", 3, payer, merchant)
    assert short.status_code == 409 and short.json()["error"]["code"] == "out_of_stock"
    assert (await _order(client, "ticket-a", 1, payer, merchant)).status_code == 201
    view = (await client.get("/v1/skus/ticket-a")).json()
    assert (view["stock"], view["sold"], view["reserved"]) == (10, 10, 0)
    assert (await client.get(f"/v1/accounts/{merchant}")).json()["balance"] == 400
    check_ledger(db_url).assert_sound()


async def test_refused_payment_reserves_nothing(client: httpx.AsyncClient) -> None:
    await client.post("/v1/skus", json={"sku": "ticket-b", "stock": 5})
    broke = await open_account(client)
    merchant = await open_account(client, kind="merchant")
    resp = await _order(client, "ticket-b", 2, broke, merchant, amount=500)
    assert resp.status_code == 402
    view = (await client.get("/v1/skus/ticket-b")).json()
    assert (view["sold"], view["reserved"]) == (0, 0)


async def test_concurrent_buyers_never_oversell(client: httpx.AsyncClient, db_url: str) -> None:
    await client.post("/v1/skus", json={"sku": "flash-1", "stock": 50})
    merchant = await open_account(client, kind="merchant")
    buyers = [await open_account(client, deposit=10_000) for _ in range(40)]
    responses = await asyncio.gather(*(_order(client, "flash-1", 2, b, merchant)
                                       for b in buyers))
    codes = Counter(r.status_code for r in responses)
    assert codes[201] == 25 and codes[409] == 15, codes
    view = (await client.get("/v1/skus/flash-1")).json()
    assert view["sold"] == 50 and view["reserved"] == 0
    with psycopg.connect(db_url) as conn:
        sold = conn.execute("select coalesce(sum(quantity), 0) from orders "
                            "where sku = 'flash-1' and status = 'confirmed'").fetchone()
        paid = conn.execute("select count(*) from payments where payee_id = %s",
                            (merchant,)).fetchone()
    assert sold == (50,) and paid == (25,), "one payment per sold order, none for refusals"
    check_ledger(db_url).assert_sound()


async def test_bad_stock_input(client: httpx.AsyncClient) -> None:
    payer = await open_account(client, deposit=1_000)
    merchant = await open_account(client, kind="merchant")
    for body in ({"sku": "bad sku!", "stock": 1}, {"sku": "x", "stock": -1},
                 {"sku": "x", "stock": 1.5}, {"sku": "x", "stock": 1, "mode": "lazy"},
                 {"sku": "x", "stock": 1, "extra": 1}):
        resp = await client.post("/v1/skus", json=body)
        assert resp.status_code == 400, (body, resp.text)
    await client.post("/v1/skus", json={"sku": "dup", "stock": 1})
    again = await client.post("/v1/skus", json={"sku": "dup", "stock": 1})
    assert again.status_code == 409 and again.json()["error"]["code"] == "sku_exists"
    assert (await _order(client, "nope", 1, payer, merchant)).status_code == 404
    assert (await _order(client, "dup", 0, payer, merchant)).status_code == 400
    assert (await client.get("/v1/skus/nope")).status_code == 404


async def test_strict_mode_sells_out_exactly_under_the_global_lock(
        client: httpx.AsyncClient, db_url: str) -> None:
    """`mode: strict`: the whole stock is allotted to the SKU's home region and every
    reservation takes the global lock; concurrent buyers still get exactly the stock, and
    the refused ones pay nothing."""
    created = await client.post("/v1/skus", json={"sku": "strict-1", "stock": 9,
                                                  "mode": "strict"})
    assert created.status_code == 201, created.text
    assert created.json()["mode"] == "strict"
    assert created.json()["allotments"]["us-east"]["allotted"] == 9
    merchant = await open_account(client, kind="merchant")
    buyers = [await open_account(client, deposit=10_000) for _ in range(8)]
    responses = await asyncio.gather(*(_order(client, "strict-1", 2, b, merchant)
                                       for b in buyers))
    codes = Counter(r.status_code for r in responses)
    assert codes == {201: 4, 409: 4}, codes
    assert all(r.json()["error"]["code"] == "out_of_stock"
               for r in responses if r.status_code == 409)
    # The last unit is still there, and sold to whoever asks for exactly one.
    assert (await _order(client, "strict-1", 2, buyers[0], merchant)).status_code == 409
    last = await _order(client, "strict-1", 1, buyers[0], merchant)
    assert last.status_code == 201, last.text
    view = (await client.get("/v1/skus/strict-1")).json()
    assert (view["mode"], view["stock"], view["sold"], view["reserved"]) == (
        "strict", 9, 9, 0)
    assert (await client.get(f"/v1/accounts/{merchant}")).json()["balance"] == 500
    check_ledger(db_url).assert_sound()
