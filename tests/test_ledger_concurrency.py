"""Invariant 1-4 under concurrency: one hot payer and one hot payee hammered by 50+ clients."""

from __future__ import annotations

import asyncio
import random

import httpx
import psycopg
import pytest

from tests.helpers import check_ledger, open_account

pytestmark = pytest.mark.integration

CLIENTS = 60
PAYMENTS_PER_CLIENT = 8


async def test_hot_accounts_under_concurrency(client: httpx.AsyncClient, db_url: str) -> None:
    hot_payer = await open_account(client, deposit=50_000)
    hot_payee = await open_account(client, kind="merchant")
    others = [await open_account(client, deposit=5_000) for _ in range(6)]
    acknowledged: list[dict[str, object]] = []
    declined = 0
    rng = random.Random(7)

    async def one_client(n: int) -> None:
        nonlocal declined
        for _ in range(PAYMENTS_PER_CLIENT):
            # Mostly the hot payer; amounts up to well beyond its balance share.
            payer = hot_payer if rng.random() < 0.7 else rng.choice(others)
            payee = hot_payee if rng.random() < 0.8 else rng.choice([*others, hot_payer])
            if payer == payee:
                payee = hot_payee
            amount = rng.choice([1, 50, 199, 1_000, 4_000, 60_000])
            manual = rng.random() < 0.2
            resp = await client.post("/v1/payments", json={
                "payer": payer, "payee": payee, "amount": amount, "currency": "USD",
                "capture_method": "manual" if manual else "automatic"})
            if resp.status_code == 402:
                declined += 1
                continue
            assert resp.status_code == 201, resp.text
            payment = resp.json()
            acknowledged.append(payment)
            if manual and rng.random() < 0.5:
                cap = await client.post(f"/v1/payments/{payment['id']}/capture")
                assert cap.status_code == 200, cap.text
            elif manual:
                can = await client.post(f"/v1/payments/{payment['id']}/cancel")
                assert can.status_code == 200, can.text

    await asyncio.gather(*(one_client(i) for i in range(CLIENTS)))

    assert declined > 0, "the workload must include payments beyond the balance"
    assert len(acknowledged) > CLIENTS, "most payments should have gone through"
    check_ledger(db_url).assert_sound()
    with psycopg.connect(db_url) as conn:
        stored = dict(conn.execute("select id::text, status from payments").fetchall())
        per_payment = dict(conn.execute(
            "select payment_id::text, count(distinct journal_id) from journal_entries "
            "where payment_id is not null group by payment_id").fetchall())
    ids = [p["id"] for p in acknowledged]
    assert len(set(ids)) == len(ids)
    assert set(ids) == set(stored), "every acknowledged payment is stored, and nothing else"
    for pid, status in stored.items():
        # Exactly one posting per captured payment, none for holds that were canceled.
        assert per_payment.get(pid, 0) == (1 if status == "succeeded" else 0), (pid, status)
    payer = (await client.get(f"/v1/accounts/{hot_payer}")).json()
    assert payer["available"] >= 0 and payer["held"] >= 0


async def test_entries_page_newest_first_with_starting_after(
        client: httpx.AsyncClient) -> None:
    """`GET /v1/accounts/{id}/entries?limit=&starting_after=<next_cursor>`: the pages,
    followed to the end, are every entry exactly once, newest first, the same as one big
    page; entries added meanwhile never shift a page already read."""
    payer = await open_account(client, deposit=1_000)
    payee = await open_account(client, kind="merchant")
    for amount in range(1, 8):
        resp = await client.post("/v1/payments", json={
            "payer": payer, "payee": payee, "amount": amount, "currency": "USD"})
        assert resp.status_code == 201, resp.text
    url = f"/v1/accounts/{payer}/entries"
    everything = (await client.get(url, params={"limit": 100})).json()
    assert everything["has_more"] is False and everything["next_cursor"] is None
    assert [e["amount"] for e in everything["data"]] == [-7, -6, -5, -4, -3, -2, -1, 1_000]
    ids = [e["id"] for e in everything["data"]]
    assert ids == sorted(ids, reverse=True)

    pages, cursor = [], None
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor is not None:
            params["starting_after"] = cursor
        page = (await client.get(url, params=params)).json()
        pages.append([e["id"] for e in page["data"]])
        if len(pages) == 1:  # a new entry after the first page does not shift the next
            paid = await client.post("/v1/payments", json={
                "payer": payer, "payee": payee, "amount": 50, "currency": "USD"})
            assert paid.status_code == 201, paid.text
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        assert page["next_cursor"] == page["data"][-1]["id"]
        cursor = page["next_cursor"]
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [i for p in pages for i in p] == ids
    newest = (await client.get(url, params={"limit": 1})).json()["data"][0]
    assert newest["amount"] == -50 and newest["id"] not in ids

    after_last = (await client.get(url, params={"starting_after": ids[-1]})).json()
    assert after_last["data"] == [] and after_last["has_more"] is False
    bad = await client.get(url, params={"starting_after": "not-an-id"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "starting_after"
    for limit in (0, 101):
        assert (await client.get(url, params={"limit": limit})).status_code == 400
