"""Flash sale across three regions: stock 1,000, demand 5,000 units from concurrent buyers
in every region, run normally, with one region's Redis down, and with one WAN link cut.
Sold units equal the stock exactly every time, never more; every order whose payment
failed released its units and its payer got the money back; nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from cluster.lab import Cluster, start_cluster
from cluster.servers import start_redis
from tests.helpers import post_as_a_client_would, until

pytestmark = [pytest.mark.integration, pytest.mark.multiregion, pytest.mark.chaos,
              pytest.mark.slow]

REGIONS = ("us-east", "eu-west", "ap-southeast")
STOCK = 300
DEMAND_UNITS = 1_500
QTY = 10
CONCURRENCY = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-region lab with a little WAN delay, stopped even if a test fails."""
    lab = start_cluster(tmp_path_factory.mktemp("flash"), regions=3, wan_scale=0.1,
                        extra_env={"PAYCLUSTER_TRANSFER_POLL_SECONDS": "0.1"})
    try:
        yield lab
    finally:
        lab.stop()


async def _created(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> str:
    """The id of what a POST created (retried as a client would: a busy lab may say 503)."""
    resp = await post_as_a_client_would(client, path, body)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


@pytest.fixture(scope="module")
async def shoppers(cluster: Cluster) -> AsyncIterator[dict[str, Any]]:
    """Funded buyers and a merchant homed in every region, plus a closed merchant whose
    cross-region payments are refused (so some orders must be compensated)."""
    clients = {r: httpx.AsyncClient(base_url=cluster.region(r).api_url, timeout=30,
                                    headers=cluster.auth_headers())
               for r in REGIONS}
    buyers: dict[str, list[str]] = {}
    merchants: dict[str, str] = {}
    for region in REGIONS:
        c = clients[region]
        merchants[region] = await _created(c, "/v1/accounts",
                                          {"currency": "USD", "kind": "merchant"})
        buyers[region] = []
        for _ in range(8):
            acc = await _created(c, "/v1/accounts", {"currency": "USD"})
            await _created(c, f"/v1/accounts/{acc}/deposits", {"amount": 10_000_000})
            buyers[region].append(acc)
    closed = await _created(clients["eu-west"], "/v1/accounts",
                            {"currency": "USD", "kind": "merchant"})
    closing = await post_as_a_client_would(clients["eu-west"], f"/v1/accounts/{closed}/close", {})
    assert closing.status_code == 200, closing.text
    try:
        yield {"clients": clients, "buyers": buyers, "merchants": merchants, "closed": closed}
    finally:
        for c in clients.values():
            await c.aclose()


async def _sale(cluster: Cluster, shoppers: dict[str, Any], sku: str, *,
                during: Any = None) -> dict[str, int]:
    clients: dict[str, httpx.AsyncClient] = shoppers["clients"]
    created = await clients["us-east"].post("/v1/skus", json={"sku": sku, "stock": STOCK})
    assert created.status_code == 201, created.text
    await until(lambda: all(_has_sku(cluster, r, sku) for r in REGIONS), "sku everywhere")
    rng = random.Random(sku)
    outcome = {"ok": 0, "out_of_stock": 0, "refused": 0, "other": 0}
    placed: list[str] = []

    async def buy(i: int) -> None:
        region = REGIONS[i % 3]
        payer = rng.choice(shoppers["buyers"][region])
        payee = shoppers["closed"] if i % 10 == 0 else shoppers["merchants"][region]
        try:
            resp = await clients[region].post("/v1/orders", json={
                "sku": sku, "quantity": QTY, "payer": payer, "payee": payee, "amount": 250,
                "currency": "USD"}, headers={"Idempotency-Key": f"{sku}-{i}"})
        except httpx.TransportError:
            outcome["other"] += 1
            return
        if resp.status_code == 201:
            outcome["ok"] += 1
            placed.append(resp.json()["id"])
        elif resp.status_code == 409 and resp.json()["error"]["code"] == "out_of_stock":
            outcome["out_of_stock"] += 1
        elif resp.status_code == 400 and resp.json()["error"]["code"] == "account_closed":
            outcome["refused"] += 1  # closed payee in the buyer's own region: refused at once
        else:
            assert resp.status_code in (503,), resp.text  # lock or peer unreachable: retryable
            outcome["other"] += 1

    sem = asyncio.Semaphore(CONCURRENCY)

    async def bounded(i: int) -> None:
        async with sem:
            await buy(i)

    orders = DEMAND_UNITS // QTY
    if during is not None:
        async with during():
            await asyncio.gather(*(bounded(i) for i in range(orders)))
    else:
        await asyncio.gather(*(bounded(i) for i in range(orders)))
    # Units stranded by the fault (in flight, or released by failed payments) are sold by
    # buyers who keep trying, as in any sale that has not sold out.
    extra = orders
    deadline = time.monotonic() + 90
    while _sold(cluster, sku) < STOCK and time.monotonic() < deadline:
        await asyncio.gather(*(bounded(extra + k) for k in range(12)))
        extra += 12
        await asyncio.sleep(0.2)
    await _quiesce(cluster, sku)
    return outcome


def _has_sku(cluster: Cluster, region: str, sku: str) -> bool:
    with psycopg.connect(cluster.region(region).dsn) as conn:
        return conn.execute("select 1 from skus where sku = %s", (sku,)).fetchone() is not None


def _sold(cluster: Cluster, sku: str) -> int:
    with psycopg.connect(cluster.region("us-east").dsn) as conn:
        row = conn.execute("select coalesce(sum(sold), 0) from sku_allotments where sku = %s",
                           (sku,)).fetchone()
    return int(row[0]) if row else 0


async def _quiesce(cluster: Cluster, sku: str, within: float = 60) -> None:
    """Every region agrees on allotments and orders, no order is still reserved."""
    deadline = time.monotonic() + within
    while True:
        views = [_stock_view(cluster, r, sku) for r in REGIONS]
        if all(v == views[0] for v in views) and views[0]["open_orders"] == 0:
            return
        assert time.monotonic() < deadline, views
        await asyncio.sleep(0.3)


def _stock_view(cluster: Cluster, region: str, sku: str) -> dict[str, Any]:
    with psycopg.connect(cluster.region(region).dsn) as conn:
        allot = conn.execute("select region, allotted, sold, reserved from sku_allotments "
                             "where sku = %s order by region", (sku,)).fetchall()
        open_orders = conn.execute("select count(*) from orders where sku = %s and "
                                   "status = 'reserved'", (sku,)).fetchone()[0]  # type: ignore[index]
        in_flight = conn.execute(
            "select coalesce(sum(g.units), 0) from stock_grants g left join "
            "stock_grant_receipts r on r.grant_id = g.id where g.sku = %s and r.grant_id "
            "is null", (sku,)).fetchone()[0]  # type: ignore[index]
    return {"allotments": allot, "open_orders": open_orders, "in_flight": int(in_flight)}


def _check(cluster: Cluster, sku: str) -> None:
    for region in REGIONS:
        with psycopg.connect(cluster.region(region).dsn) as conn:
            allotted, sold, reserved = conn.execute(
                "select sum(allotted), sum(sold), sum(reserved) from sku_allotments "
                "where sku = %s", (sku,)).fetchone()  # type: ignore[misc]
            confirmed = conn.execute("select coalesce(sum(quantity), 0) from orders where "
                                     "sku = %s and status = 'confirmed'", (sku,)).fetchone()
            bad = conn.execute(
                "select o.id, o.status, p.status from orders o join payments p on "
                "p.id = o.payment_id where o.sku = %s and ((o.status = 'confirmed' and "
                "p.status <> 'succeeded') or (o.status = 'released' and p.status "
                "not in ('failed', 'canceled')))", (sku,)).fetchall()
            refunded = conn.execute(
                "select count(*) from payments p join orders o on o.payment_id = p.id "
                "where o.sku = %s and p.status = 'failed' and not exists (select 1 from "
                "journal_entries e where e.payment_id = p.id and "
                "e.entry_type = 'transfer_reversal')", (sku,)).fetchone()
        assert sold == STOCK, f"{region}: sold {sold} of {STOCK}"
        assert reserved == 0 and allotted == STOCK, (region, allotted, reserved)
        assert confirmed == (STOCK,), (region, confirmed)
        assert bad == [], bad
        assert refunded == (0,), "every failed order payment was refunded to its payer"


async def test_flash_sale_normal(cluster: Cluster, shoppers: dict[str, Any]) -> None:
    sku = f"flash-{uuid.uuid4().hex[:6]}"
    outcome = await _sale(cluster, shoppers, sku)
    assert outcome["ok"] >= STOCK // QTY and outcome["out_of_stock"] > 0, outcome
    _check(cluster, sku)


async def test_flash_sale_with_one_redis_down(cluster: Cluster,
                                              shoppers: dict[str, Any]) -> None:
    servers = cluster.region("ap-southeast").servers
    sku = f"redisdown-{uuid.uuid4().hex[:6]}"

    @contextlib.asynccontextmanager
    async def redis_down() -> AsyncIterator[None]:
        old = servers.redis
        old.kill()
        try:
            yield
        finally:
            # Back empty, as a Redis without persistence restarts: the lock service keeps
            # it in quarantine while the other two carry the quorum.
            servers.redis = start_redis(old.data_dir, port=old.port)

    outcome = await _sale(cluster, shoppers, sku, during=redis_down)
    assert outcome["ok"] >= STOCK // QTY, outcome
    _check(cluster, sku)


async def test_flash_sale_with_link_cut(cluster: Cluster, shoppers: dict[str, Any]) -> None:
    assert cluster.wan is not None
    sku = f"cut-{uuid.uuid4().hex[:6]}"

    @contextlib.asynccontextmanager
    async def cut() -> AsyncIterator[None]:
        with cluster.wan.control() as wan:  # type: ignore[union-attr]
            wan.cut("us-east", "eu-west")
            try:
                yield
            finally:
                wan.heal("us-east", "eu-west")

    outcome = await _sale(cluster, shoppers, sku, during=cut)
    assert outcome["ok"] >= STOCK // QTY, outcome
    _check(cluster, sku)
