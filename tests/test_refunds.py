"""Refunds of every payment, wherever its payer and payee live (issue 14).

Same home region: one transaction, the refund `succeeded` at once. Across regions: the
reverse saga (region_node/refunds.py) between two in-process nodes over real mutual-TLS
gRPC (`two_regions`, no replication: the push path), and on a real two-region lab for a
refund during a planned handover (replication and ownership move).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from cluster.failover_cli import failover_targets
from cluster.lab import Cluster, start_cluster
from cluster.servers import RegionServers
from region_node import refunds
from region_node.db import Database
from region_node.principals import Principal
from replication.failover import RegionHandle, planned_handover
from replication.reconcile import lost_tail
from tests.conftest import two_regions
from tests.helpers import check_ledger, cluster_ledger_checks, open_account

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


# ------------------------------------------------------------------ a lost tail

async def test_a_refund_lost_in_a_tail_is_listed_and_its_credit_parked(
        servers: RegionServers) -> None:
    """eu-west (serving the merchant's home) started a refund, us-east credited the payer
    from the push, then eu-west is taken over by us-east and its unreplicated tail lost
    (here: no replication at all, so its whole store is the tail). The refund is listed
    for reconciliation with the merchant's debit; the payer's credit is an orphan refund
    credit, parked in us-east's suspense account once, so us-east's books balance."""
    async with two_regions(servers, grpc_deadline_seconds=20.0) as (a, b, db_a, db_b, _):
        _, payee, pid = await _cross_payment(a, b, 1_000, deposit=1_000)
        resp = await b.post(f"/v1/payments/{pid}/refunds", json={"amount": 400})
        assert resp.status_code == 201, resp.text
        rid = resp.json()["id"]
        await _wait(b, f"/v1/refunds/{rid}", "succeeded")
        clearing_a = _one(db_a, "select id::text from accounts where kind = 'clearing'")
        # The forced takeover of eu-west by us-east, as crash_takeover records it.
        with psycopg.connect(db_a) as conn:
            conn.execute("insert into ownership_epochs (home_region, epoch, serving_region) "
                         "values ('eu-west', 7, 'us-east')")
            conn.execute("insert into ownership_takeovers (home_region, epoch, serving_region,"
                         " from_region, from_epoch, forced) values "
                         "('eu-west', 7, 'us-east', 'eu-west', 1, true)")
        tail = lost_tail(RegionHandle("eu-west", "http://unused", db_b),
                         {"us-east": RegionHandle("us-east", "http://unused", db_a)}, "eu-west")
        assert [(r["id"], r["amount"], r["status"], r["payee"]) for r in tail.refunds] == [
            (rid, 400, "succeeded", payee)]
        assert [(e["account_id"], e["amount"], e["entry_type"])
                for e in tail.refunds[0]["entries"] if e["amount"] < 0] == [
            (payee, -400, "refund_out")], "the merchant's lost debit is listed with it"
        assert [(c["refund_id"], c["amount"], c["credit_region"], c["clearing_account"])
                for c in tail.orphan_refund_credits] == [(rid, 400, "us-east", clearing_a)]
        with psycopg.connect(db_a) as conn:
            kinds = dict(conn.execute(
                "select item_kind, amount from reconciliation_items where item_id = any(%s)",
                ([rid, tail.orphan_refund_credits[0]["journal_id"]],)).fetchall())
        assert kinds == {"refund": 400, "orphan_refund_credit": 400}
        # us-east's refund scan parks it, once.
        deadline = time.monotonic() + 20
        while _one(db_a, "select count(*) from journal_entries "
                         "where entry_type = 'suspense_refund'") == 0:
            assert time.monotonic() < deadline, "orphan refund credit not parked"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert _one(db_a, "select count(distinct journal_id) from journal_entries "
                          "where entry_type = 'suspense_refund'") == 1
        assert _one(db_a, "select balance from accounts where kind = 'suspense'") == -400
        # us-east alone: 1,000 went into transit to eu-west (credited there, in the tail);
        # the refund's 400 came back out of clearing and is now covered by suspense.
        assert _clearing(db_a) == 1_000
        check_ledger(db_a).assert_sound()
        # The operator writes it off at any region (the credit region settles it): the
        # house absorbs the refund paid without a debit, suspense back to zero, once.
        item = {"home_region": "eu-west", "takeover_epoch": 7,
                "item_id": tail.orphan_refund_credits[0]["journal_id"],
                "resolution": "claw_back", "note": "merchant keeps it, house pays"}
        refused = await a.post("/v1/admin/reconciliation/resolve", json=item)
        assert refused.status_code == 400, refused.text
        written = await a.post("/v1/admin/reconciliation/resolve",
                               json={**item, "resolution": "write_off"})
        assert written.status_code == 201, written.text
        again = await a.post("/v1/admin/reconciliation/resolve",
                             json={**item, "resolution": "write_off"})
        assert again.status_code == 409, again.text
        assert _one(db_a, "select balance from accounts where kind = 'suspense'") == 0
        check_ledger(db_a).assert_sound()


# ------------------------------------------------------------------ planned handovers

@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real two-region lab (replication, leases, the refund scans), stopped at the end."""
    cluster = start_cluster(tmp_path_factory.mktemp("lab"), regions=2, wan_scale=0,
                            extra_env={"PAYCLUSTER_TRANSFER_POLL_SECONDS": "0.1"})
    try:
        yield cluster
    finally:
        cluster.stop()


class RefundClients:
    """Merchants refunding through both regions, retrying (same key) what got no decision."""

    def __init__(self, clients: list[httpx.AsyncClient], payments: list[str]) -> None:
        self.clients = clients
        self.payments = payments
        self.acked: dict[str, dict[str, Any]] = {}  # refund id -> the answer
        self.refused: dict[str, int] = {}  # error code -> count
        self.retries = 0

    async def run(self, worker: int, stop: asyncio.Event) -> None:
        rng = random.Random(worker)
        while not stop.is_set():
            pid = rng.choice(self.payments)
            key = f"handover-{uuid.uuid4()}"
            while True:
                try:
                    resp = await rng.choice(self.clients).post(
                        f"/v1/payments/{pid}/refunds", json={"amount": 40},
                        headers={"Idempotency-Key": key})
                except httpx.HTTPError:
                    # A connection dropped under the handover: no answer, so ask again.
                    self.retries += 1
                    await asyncio.sleep(0.05)
                    continue
                code = resp.json().get("error", {}).get("code") if resp.status_code >= 400 else None
                if resp.status_code == 503 or code == "idempotency_key_in_use":
                    # The handover's ban, a lost lease, a forward in flight: no decision
                    # yet, so the same request again, as any client would.
                    self.retries += 1
                    await asyncio.sleep(0.05)
                    continue
                break
            if resp.status_code == 201:
                self.acked[resp.json()["id"]] = resp.json()
            else:
                assert resp.status_code in (400, 409), resp.text
                self.refused[str(code)] = self.refused.get(str(code), 0) + 1
            await asyncio.sleep(0.02)


@pytest.mark.multiregion
@pytest.mark.chaos
async def test_refunds_during_planned_handovers_of_either_region(lab: Cluster) -> None:
    payer_home, payee_home = lab.names[0], lab.names[1]
    clients = {name: httpx.AsyncClient(base_url=lab.region(name).api_url, timeout=30,
                                       headers=lab.auth_headers()) for name in lab.names}
    deposits = 0
    try:
        pays: list[str] = []
        merchant = await open_account(clients[payee_home], kind="merchant",
                                      home_region=payee_home)
        local_payer = await open_account(clients[payee_home], deposit=2_000,
                                         home_region=payee_home)
        deposits += 2_000
        for _ in range(4):
            payer = await open_account(clients[payer_home], deposit=1_000,
                                       home_region=payer_home)
            deposits += 1_000
            resp = await clients[payer_home].post("/v1/payments", json={
                "payer": payer, "payee": merchant, "amount": 1_000, "currency": "USD"})
            assert resp.status_code == 201, resp.text
            pays.append(resp.json()["id"])
        resp = await clients[payee_home].post("/v1/payments", json={
            "payer": local_payer, "payee": merchant, "amount": 2_000, "currency": "USD"})
        assert resp.status_code == 201, resp.text
        pays.append(resp.json()["id"])
        for pid in pays:
            await _wait(clients[payer_home], f"/v1/payments/{pid}?consistency=strong",
                        "succeeded")

        work = RefundClients(list(clients.values()), pays)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(work.run(i, stop)) for i in range(6)]
        try:
            await asyncio.sleep(1.0)
            # The payee's home moves (the refunds' writer), then the payer's home (the
            # payment rows' writer, who credits the payers), each over and back.
            for home, other in ((payee_home, payer_home), (payer_home, payee_home)):
                regions, lock_urls = failover_targets(lab, other)
                over = await planned_handover(regions, lock_urls, home, other,
                                              headers=lab.auth_headers())
                assert not over.aborted, over
                await asyncio.sleep(1.5)
                regions, lock_urls = failover_targets(lab, home)
                back = await planned_handover(regions, lock_urls, home, home,
                                              headers=lab.auth_headers())
                assert not back.aborted, back
                await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        assert len(work.acked) > 10, (work.acked, work.refused)

        # Every acknowledged refund ends succeeded, once, in both regions' copies.
        deadline = time.monotonic() + 60
        while True:
            views = []
            for name in lab.names:
                with psycopg.connect(lab.region(name).dsn) as conn:
                    views.append(conn.execute(
                        "select id::text, payment_id::text, amount, status from refunds "
                        "where payment_id = any(%s::uuid[]) order by id", (pays,)).fetchall())
            if views[0] == views[1] and all(r[3] == "succeeded" for r in views[0]):
                break
            assert time.monotonic() < deadline, views
            await asyncio.sleep(0.3)
        assert {r[0] for r in views[0]} == set(work.acked), "acknowledged = stored, once"
        by_payment: dict[str, int] = {}
        for _, pid, amount, _ in views[0]:
            by_payment[pid] = by_payment.get(pid, 0) + int(amount)
        deadline = time.monotonic() + 30
        while True:
            refunded = {}
            for name in lab.names:
                with psycopg.connect(lab.region(name).dsn) as conn:
                    refunded[name] = dict(conn.execute(
                        "select id::text, amount_refunded from payments "
                        "where id = any(%s::uuid[])", (pays,)).fetchall())
            want = {pid: by_payment.get(pid, 0) for pid in pays}
            if all(r == want for r in refunded.values()):
                break
            assert time.monotonic() < deadline, (refunded, want)
            await asyncio.sleep(0.3)
        assert all(v <= 2_000 for v in by_payment.values())
    finally:
        for client in clients.values():
            await client.aclose()
    for name in lab.names:
        cluster_ledger_checks(lab.region(name).dsn, deposits)
