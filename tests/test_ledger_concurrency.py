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
