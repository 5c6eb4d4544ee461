"""Signed webhooks: the verify function, and delivery to a real local HTTP receiver.

The receiver is an aiohttp server on 127.0.0.1 in the test's event loop; payments go
through the real API of an in-process node (its WebhookWorker running) on real
PostgreSQL / Redis / NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from aiohttp import web

from cluster.lab import Cluster, start_cluster
from region_node.config import RegionSettings
from region_node.db import Database
from region_node.ids import new_id
from region_node.node import Node
from region_node.webhooks import store
from region_node.webhooks.delivery import WebhookWorker, lease_seconds, retry_delay
from region_node.webhooks.signing import (
    SIGNATURE_HEADER,
    SignatureError,
    compute,
    new_secret,
    parse,
    sign,
    verify,
)
from tests.conftest import app_client
from tests.helpers import open_account, post_as_a_client_would

WAIT = 30.0
"""Upper bound of every wait; a healthy run needs a small fraction of it."""

FAST = {"webhook_poll_seconds": 0.05, "webhook_retry_base_seconds": 0.2,
        "webhook_retry_max_interval_seconds": 1.0, "webhook_timeout_seconds": 2.0}
"""Retry schedule squeezed from minutes to fractions of a second for the tests."""


# --------------------------------------------------------------------------- verify

BODY = b'{"id":"evt_1","type":"payment.succeeded"}'


def test_verify_accepts_a_genuine_signature() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(secret) == 46
    header = sign(BODY, [secret], timestamp=1_800_000_000)
    verify(BODY, header, secret, now=1_800_000_010)


def test_verify_rejects_a_tampered_body() -> None:
    secret = new_secret()
    header = sign(BODY, [secret], timestamp=1_800_000_000)
    with pytest.raises(SignatureError, match="tampered"):
        verify(BODY.replace(b"succeeded", b"failed"), header, secret, now=1_800_000_000)


def test_verify_rejects_a_stale_timestamp() -> None:
    secret = new_secret()
    header = sign(BODY, [secret], timestamp=1_800_000_000)
    verify(BODY, header, secret, now=1_800_000_300)  # exactly at the tolerance: fine
    with pytest.raises(SignatureError, match="stale"):
        verify(BODY, header, secret, now=1_800_000_301)
    with pytest.raises(SignatureError, match="stale"):  # from the future, too
        verify(BODY, header, secret, now=1_799_999_000)
    verify(BODY, header, secret, tolerance=3600, now=1_800_001_000)


def test_verify_rejects_a_wrong_secret() -> None:
    header = sign(BODY, [new_secret()], timestamp=1_800_000_000)
    with pytest.raises(SignatureError, match="wrong secret"):
        verify(BODY, header, new_secret(), now=1_800_000_000)


@pytest.mark.parametrize("header", ["", "t=123", "v1=abc", "t=abc,v1=00", "garbage",
                                    "t=1,t=2,v1=00", "t=-5,v1=00"])
def test_verify_rejects_malformed_headers(header: str) -> None:
    with pytest.raises(SignatureError, match="malformed"):
        verify(BODY, header, new_secret(), now=1)


def test_verify_accepts_any_of_several_signatures() -> None:
    old, new = new_secret(), new_secret()
    header = sign(BODY, [old, new], timestamp=1_800_000_000)
    ts, sigs = parse(header)
    assert ts == 1_800_000_000 and sigs == [compute(BODY, old, ts), compute(BODY, new, ts)]
    verify(BODY, header, old, now=ts)
    verify(BODY, header, new, now=ts)
    with pytest.raises(SignatureError):
        verify(BODY, header, new_secret(), now=ts)
    # An unknown future scheme next to v1 is ignored, not an error.
    verify(BODY, header + ",v2=deadbeef", new, now=ts)


def test_retry_delay_grows_exponentially_with_bounded_jitter() -> None:
    lows = [retry_delay(n, base=30, cap=3600, rand=0.0) for n in range(1, 10)]
    highs = [retry_delay(n, base=30, cap=3600, rand=1.0) for n in range(1, 10)]
    assert highs[:7] == [30, 60, 120, 240, 480, 960, 1920]
    assert highs[7:] == [3600, 3600]  # capped
    assert lows == [h / 2 for h in highs]
    # Up to a day of retries at the defaults is a few dozen attempts, not thousands.
    total, attempts = 0.0, 0
    while total < 86400:
        attempts += 1
        total += retry_delay(attempts, base=30, cap=3600, rand=0.5)
    assert 25 < attempts < 60


# --------------------------------------------------------------------------- receiver

@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    at: float


@dataclass
class Receiver:
    """A real HTTP endpoint on 127.0.0.1 that records what it gets.

    `fail_first` answers 500 to the first n requests of every event id (counting
    redeliveries), then 200.
    """

    fail_first: int = 0
    hang: dict[str, float] = field(default_factory=dict)
    """path -> seconds to wait before answering (longer than the sender's timeout: hangs)."""
    received: dict[str, list[Received]] = field(default_factory=dict)
    url: str = ""
    peak: Counter[str] = field(default_factory=Counter)
    """The most requests a path had open at once."""
    _tries: Counter[str] = field(default_factory=Counter)
    _open: Counter[str] = field(default_factory=Counter)

    def by_path(self, path: str) -> list[Received]:
        return self.received.get(path, [])

    def event_ids(self, path: str) -> list[str]:
        return [json.loads(r.body)["id"] for r in self.by_path(path)]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event_id = json.loads(body)["id"]
        key = f"{request.path}:{event_id}"
        self._tries[key] += 1
        if self._tries[key] <= self.fail_first:
            return web.Response(status=500, text="not yet")
        if request.path in self.hang:
            self._open[request.path] += 1
            self.peak[request.path] = max(self.peak[request.path], self._open[request.path])
            try:
                await asyncio.sleep(self.hang[request.path])
            finally:
                self._open[request.path] -= 1
        self.received.setdefault(request.path, []).append(
            Received(body, dict(request.headers), time.monotonic()))
        return web.Response(status=200, text="ok")


@contextlib.asynccontextmanager
async def receiver(**kwargs: Any) -> AsyncIterator[Receiver]:
    """Run a Receiver on a free port; stopped on exit, even on failure."""
    rec = Receiver(**kwargs)
    app = web.Application()
    app.router.add_post("/{tail:.*}", rec.handle)
    # handler_cancellation: a request the sender gave up on (timeout) stops counting as
    # open, as it would for a real server.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        rec.url = f"http://127.0.0.1:{port}"
        yield rec
    finally:
        await runner.cleanup()


async def wait_until(check: Callable[[], Any], what: str, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out after {within}s waiting for {what}"
        await asyncio.sleep(0.02)


async def drained(dsn: str) -> None:
    """Wait until every event is fanned out and every delivery has finished (nothing
    pending, nothing queued): no POST can arrive after this, so what the receiver holds
    is final (a duplicate or a wrongly routed event would be there)."""
    def empty() -> bool:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("select (select count(*) from webhook_pending_events) "
                               "+ (select count(*) from webhook_queue)").fetchone()
        return row is not None and row[0] == 0
    await wait_until(empty, "every webhook delivery to finish")


# --------------------------------------------------------------------------- setup

@contextlib.asynccontextmanager
async def node(settings: RegionSettings, **overrides: Any
               ) -> AsyncIterator[tuple[httpx.AsyncClient, Database]]:
    """An in-process node with fast webhook retries, and a pool on its database."""
    fast = settings.model_copy(update={**FAST, **overrides})
    db = Database(settings.database_url, pool_size=2, max_overflow=0)
    try:
        async with app_client(fast) as client:
            yield client, db
    finally:
        await db.dispose()


async def register(db: Database, url: str, *, principal: uuid.UUID | None = None,
                   receives_all: bool = True, event_types: list[str] | None = None
                   ) -> tuple[uuid.UUID, str]:
    """An endpoint straight in the store (the routes are tested separately)."""
    async def step(conn: Any) -> tuple[uuid.UUID, str]:
        ep, secret = await store.create_endpoint(
            conn, endpoint_id=new_id(), secret_id=new_id(),
            principal_id=principal or uuid.uuid4(), url=url,
            event_types=event_types or ["*"], receives_all=receives_all,
            home_region="us-east")
        return ep.id, secret
    return await db.transaction(step)


async def pay(client: httpx.AsyncClient, payer: str, payee: str, amount: int = 100) -> str:
    """A payment, sent as a client would (in a lab on a starved machine a lease renewal can
    be late and a write refused with a retryable 503)."""
    resp = await post_as_a_client_would(client, "/v1/payments", {
        "payer": payer, "payee": payee, "amount": amount, "currency": "USD"}, within=WAIT)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


async def attempts_of(db: Database, endpoint_id: uuid.UUID) -> list[dict[str, Any]]:
    async with db.engine.connect() as conn:
        return await store.delivery_log(conn, endpoint_id, limit=1000)


async def log_when(db: Database, endpoint_id: uuid.UUID, status: str) -> list[dict[str, Any]]:
    """The endpoint's delivery log once its newest delivery has `status`."""
    deadline = time.monotonic() + WAIT
    while not (log := await attempts_of(db, endpoint_id)) or log[0]["status"] != status:
        assert time.monotonic() < deadline, log
        await asyncio.sleep(0.05)
    return log


# --------------------------------------------------------------------------- delivery

@pytest.mark.integration
async def test_delivered_event_is_signed_and_verifies(settings: RegionSettings) -> None:
    async with receiver() as rec, node(settings) as (client, db):
        endpoint_id, secret = await register(db, rec.url + "/hook")
        payer = await open_account(client, deposit=1000)
        payee = await open_account(client, kind="merchant")
        payment_id = await pay(client, payer, payee, 250)
        await wait_until(lambda: rec.by_path("/hook"), "the event at the receiver")

        got = rec.by_path("/hook")[0]
        verify(got.body, got.headers[SIGNATURE_HEADER], secret)
        event = json.loads(got.body)
        assert event["type"] == "payment.succeeded"
        assert event["data"]["id"] == payment_id and event["data"]["amount"] == 250
        assert got.headers["Paycluster-Event-Id"] == event["id"]
        with pytest.raises(SignatureError):
            verify(got.body + b" ", got.headers[SIGNATURE_HEADER], secret)
        with pytest.raises(SignatureError):
            verify(got.body, got.headers[SIGNATURE_HEADER], new_secret())

        log = await log_when(db, endpoint_id, "delivered")
        assert len(log) == 1
        assert [a["status_code"] for a in log[0]["attempts"]] == [200]


@pytest.mark.integration
async def test_failing_receiver_gets_the_event_later(settings: RegionSettings) -> None:
    async with receiver(fail_first=3) as rec, node(settings) as (client, db):
        endpoint_id, secret = await register(db, rec.url + "/flaky")
        payer = await open_account(client, deposit=1000)
        payee = await open_account(client, kind="merchant")
        await pay(client, payer, payee)
        started = time.monotonic()
        await wait_until(lambda: rec.by_path("/flaky"), "the event after three 500s")
        elapsed = time.monotonic() - started
        got = rec.by_path("/flaky")[0]
        verify(got.body, got.headers[SIGNATURE_HEADER], secret)
        assert got.headers["Paycluster-Delivery-Attempt"] == "4"
        # Backoff: at least the fixed halves of 0.2 + 0.4 + 0.8 s passed before attempt 4.
        assert elapsed >= 0.7, elapsed
        log = await log_when(db, endpoint_id, "delivered")
        attempts = log[0]["attempts"]
        assert [a["outcome"] for a in attempts] == ["retrying"] * 3 + ["delivered"]
        assert [a["status_code"] for a in attempts] == [500, 500, 500, 200]
        assert [a["error"] for a in attempts[:3]] == ["HTTP 500"] * 3
        assert all(a["next_attempt_at"] for a in attempts[:3])
        assert attempts[3]["next_attempt_at"] is None
        metrics = (await client.get("/metrics")).text
        assert ('paycluster_webhook_attempts_total{outcome="retrying",region="us-east"} 3.0'
                in metrics), metrics
        assert ('paycluster_webhook_attempts_total{outcome="delivered",region="us-east"} 1.0'
                in metrics)
        assert 'paycluster_webhook_delivery_seconds_count{region="us-east"} 1.0' in metrics


@pytest.mark.integration
async def test_unreachable_receiver_fails_after_max_age(settings: RegionSettings) -> None:
    async with receiver() as rec:
        dead_url = rec.url + "/gone"
    # The receiver is stopped: connection refused on every attempt.
    async with node(settings, webhook_max_age_seconds=1.5) as (client, db):
        endpoint_id, _ = await register(db, dead_url)
        payer = await open_account(client, deposit=1000)
        payee = await open_account(client, kind="merchant")
        await pay(client, payer, payee)
        log = await log_when(db, endpoint_id, "failed")
        attempts = log[0]["attempts"]
        # Retried until the max age, then failed (how many attempts fit in 1.5 s is the
        # machine's business: on a starved one the first attempt may already be too late).
        assert attempts and attempts[-1]["outcome"] == "failed"
        assert all(a["outcome"] == "retrying" for a in attempts[:-1]), attempts
        assert all(a["status_code"] is None for a in attempts)
        assert all("Connect" in a["error"] and len(a["error"]) <= 200 for a in attempts)


@pytest.mark.integration
async def test_rotation_signs_with_both_secrets_until_the_old_expires(
        settings: RegionSettings) -> None:
    async with receiver() as rec, node(settings) as (client, _db):
        created = await client.post("/v1/webhook_endpoints", json={"url": rec.url + "/rot"})
        endpoint_id, old = created.json()["id"], created.json()["secret"]
        payer = await open_account(client, deposit=1000)
        payee = await open_account(client, kind="merchant")
        # A grace no test run outlives: the first event is signed while both are valid.
        rotated = await client.post(f"/v1/webhook_endpoints/{endpoint_id}/rotate_secret",
                                    json={"expire_old_after_seconds": 3600})
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["secret"]
        assert new != old and new.startswith("whsec_")
        await pay(client, payer, payee)
        await wait_until(lambda: len(rec.by_path("/rot")) == 1, "the first event")
        got = rec.by_path("/rot")[0]
        _, sigs = parse(got.headers[SIGNATURE_HEADER])
        assert len(sigs) == 2
        verify(got.body, got.headers[SIGNATURE_HEADER], old)
        verify(got.body, got.headers[SIGNATURE_HEADER], new)

        # Another rotation with a one-second grace: once that second has passed (by the
        # store's clock), the next event is signed with the newest secret only.
        third = await client.post(f"/v1/webhook_endpoints/{endpoint_id}/rotate_secret",
                                  json={"expire_old_after_seconds": 1})
        assert third.status_code == 200, third.text
        newest = third.json()["secret"]
        until = datetime.fromisoformat(third.json()["previous_secrets_expire_at"])
        await wait_until(lambda: datetime.now(UTC) > until, "the old secrets' expiry")
        await pay(client, payer, payee)
        await wait_until(lambda: len(rec.by_path("/rot")) == 2, "the second event")
        got = rec.by_path("/rot")[1]
        _, sigs = parse(got.headers[SIGNATURE_HEADER])
        assert len(sigs) == 1
        verify(got.body, got.headers[SIGNATURE_HEADER], newest)
        for retired in (old, new):
            with pytest.raises(SignatureError):
                verify(got.body, got.headers[SIGNATURE_HEADER], retired)


@pytest.mark.integration
@pytest.mark.slow
async def test_a_hanging_receiver_does_not_hold_up_the_others(settings: RegionSettings) -> None:
    n = 24
    timeout = 5.0  # what a wait for one of /slow's slots would cost /fast at least
    async with receiver(hang={"/slow": 60.0}) as rec, \
            node(settings, webhook_timeout_seconds=timeout, webhook_endpoint_concurrency=4,
                 webhook_concurrency=16) as (client, db):
        slow_id, _ = await register(db, rec.url + "/slow")
        await register(db, rec.url + "/fast")
        payers = [await open_account(client, deposit=1000) for _ in range(4)]
        payee = await open_account(client, kind="merchant")
        committed: dict[str, float] = {}
        for i in range(n):
            committed[await pay(client, payers[i % 4], payee, 10)] = time.monotonic()
        await wait_until(lambda: len(rec.by_path("/fast")) == n, "every event at /fast")
        waits = sorted(r.at - committed[json.loads(r.body)["data"]["id"]]
                       for r in rec.by_path("/fast"))
        # /slow never answers within the timeout: at most 4 of its POSTs at a time, while
        # /fast got all its events before any of those timed out and freed a slot (none
        # is logged yet): they never waited for one.
        assert 1 <= rec.peak["/slow"] <= 4, rec.peak
        assert not any(d["attempts"] for d in await attempts_of(db, slow_id)), waits
        print(f"\n/fast: {n} events, median {waits[n // 2] * 1000:.0f} ms after commit")
        deadline = time.monotonic() + WAIT
        while not (errors := {a["error"] for d in await attempts_of(db, slow_id)
                              for a in d["attempts"]}):
            assert time.monotonic() < deadline, "no attempt of /slow logged"
            await asyncio.sleep(0.1)
        assert all(e.startswith(("TimeoutError", "ServerTimeoutError"))
                              for e in errors), errors


@pytest.mark.integration
async def test_old_delivery_log_is_purged_by_its_region(settings: RegionSettings) -> None:
    async with receiver() as rec, node(settings) as (client, db):
        endpoint_id, _ = await register(db, rec.url + "/old")
        payer = await open_account(client, deposit=1000)
        payee = await open_account(client, kind="merchant")
        await pay(client, payer, payee)
        first = await log_when(db, endpoint_id, "delivered")
        await pay(client, payer, payee)
        await wait_until(lambda: len(rec.by_path("/old")) == 2, "the second event")
        # The first delivery is older than the retention (it is backdated: nobody waits a
        # month), the second is new.
        retention = settings.webhook_log_retention_seconds
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute("update webhook_deliveries set created_at = now() - make_interval("
                         "secs => %s) where id = %s", (retention + 60, first[0]["id"]))
        janitor = Node.connect(settings)
        other = Node.connect(settings.model_copy(update={"region": "eu-west"}))
        try:
            # Another region purges nothing of ours (only rows it wrote).
            assert await WebhookWorker(other).purge() == 0
            assert await WebhookWorker(janitor).purge() == 1  # the first, past retention
        finally:
            await janitor.close()
            await other.close()
        log = await log_when(db, endpoint_id, "delivered")
        assert len(log) == 1 and len(log[0]["attempts"]) == 1
        async with db.engine.connect() as conn:
            attempts = (await conn.execute(sa.text("select count(*) from webhook_attempts"))
                        ).scalar()
        assert attempts == 1


@pytest.mark.integration
async def test_active_secrets_follow_the_rotation_log(db_url: str) -> None:
    db = Database(db_url, pool_size=1, max_overflow=0)
    try:
        endpoint_id, first = await register(db, "http://127.0.0.1:9/x")

        async def rotate(grace: float) -> str:
            async def step(conn: Any) -> str:
                secret, _ = await store.rotate_secret(
                    conn, endpoint_id=endpoint_id, secret_id=new_id(),
                    expire_old_after=timedelta(seconds=grace))
                return secret
            return await db.transaction(step)

        async def active() -> list[str]:
            async with db.engine.connect() as conn:
                return (await store.active_secrets(conn, [endpoint_id])).get(endpoint_id, [])

        second = await rotate(60)
        assert await active() == [first, second]
        third = await rotate(60)  # a second rotation within the grace: three valid
        assert await active() == [first, second, third]
        fourth = await rotate(0)  # grace 0 retires every older secret at once
        assert await active() == [fourth]
        async with db.engine.connect() as conn:
            rows = (await conn.execute(sa.text(
                "select count(*) from webhook_secrets where endpoint_id = :e"),
                {"e": endpoint_id})).scalar()
        assert rows == 4  # nothing was updated or deleted: the log only grows
    finally:
        await db.dispose()


@pytest.mark.integration
@pytest.mark.slow
async def test_concurrent_payments_are_delivered_exactly_once_per_endpoint(
        settings: RegionSettings) -> None:
    n = 200
    async with receiver() as rec, node(settings) as (client, db):
        await register(db, rec.url + "/a")
        await register(db, rec.url + "/b", event_types=["payment.succeeded"])
        await register(db, rec.url + "/c", event_types=["order.*"])
        payers = [await open_account(client, deposit=100_000) for _ in range(10)]
        payee = await open_account(client, kind="merchant")
        sem = asyncio.Semaphore(25)
        committed: dict[str, float] = {}

        async def one(i: int) -> None:
            async with sem:
                pid = await pay(client, payers[i % len(payers)], payee, 10)
                committed[pid] = time.monotonic()

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        pay_seconds = time.monotonic() - started
        await wait_until(lambda: len(set(rec.event_ids("/a"))) >= n
                         and len(set(rec.event_ids("/b"))) >= n, f"{n} events at a and b")
        await drained(settings.database_url)  # a stray duplicate would be in by now
        for path in ("/a", "/b"):
            ids = rec.event_ids(path)
            assert len(ids) == n and len(set(ids)) == n, (path, len(ids), len(set(ids)))
            payments = {json.loads(r.body)["data"]["id"] for r in rec.by_path(path)}
            assert payments == set(committed)
        assert rec.by_path("/c") == []  # no order events were produced
        latencies = sorted((r.at - committed[json.loads(r.body)["data"]["id"]]) * 1000
                           for r in rec.by_path("/a"))
        p50 = latencies[len(latencies) // 2]
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(f"\n{n} payments in {pay_seconds:.2f} s; commit -> receiver latency "
              f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {latencies[-1]:.0f} ms")


@pytest.mark.integration
@pytest.mark.slow
async def test_nothing_is_lost_when_no_worker_runs_or_a_node_dies_mid_delivery(
        settings: RegionSettings) -> None:
    dying = settings.model_copy(update={**FAST, "webhook_timeout_seconds": 0.5})
    async with receiver() as rec:
        # 1. A node without workers takes payments: the events wait in the pending table.
        async with node(settings, run_workers=False) as (client, db):
            await register(db, rec.url + "/crash")
            payer = await open_account(client, deposit=1000)
            payee = await open_account(client, kind="merchant")
            paid = {await pay(client, payer, payee) for _ in range(3)}
            await asyncio.sleep(0.3)
            assert rec.received == {}

        # 2. A worker fans them out, claims them, and dies before recording any outcome
        # (its POSTs are cut off: the process is gone as far as the database can tell).
        dead = Node.connect(dying)
        worker = WebhookWorker(dead)
        try:
            assert await worker.run_once() is False
            assert len(worker._inflight) == 3
            for task in list(worker._inflight):
                task.cancel()
            if worker._session is not None:
                await worker._session.close()
        finally:
            await dead.close()
        async with db.engine.connect() as conn:
            leased = (await conn.execute(sa.text(
                "select count(*) from webhook_queue where lease_until > now()"))).scalar()
            tried = (await conn.execute(sa.text("select count(*) from webhook_attempts"))
                     ).scalar()
        assert (leased, tried) == (3, 0)

        # 3. Another node takes over once the dead one's leases expire: every event arrives.
        started = time.monotonic()
        async with node(settings) as (_client, db2):
            await wait_until(lambda: {json.loads(r.body)["data"]["id"]
                                      for r in rec.by_path("/crash")} == paid,
                             "the three events after the lease expired")
            waited = time.monotonic() - started
            assert waited >= lease_seconds(0.5) - 1.5, waited
            async with db2.engine.connect() as conn:
                pending = (await conn.execute(sa.text(
                    "select count(*) from webhook_pending_events"))).scalar()
            assert pending == 0


# --------------------------------------------------------------------------- routes

async def merchant(client: httpx.AsyncClient, name: str) -> tuple[str, dict[str, str]]:
    """A merchant principal made by the admin: (its id, headers with its key)."""
    resp = await client.post("/v1/admin/principals", json={"name": name, "role": "merchant"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"], {"Authorization": f"Bearer {resp.json()['api_key']['key']}"}


async def own_account(client: httpx.AsyncClient, headers: dict[str, str], deposit: int = 0,
                      kind: str = "merchant") -> str:
    """An account opened with `headers`' key (so it belongs to that principal); the admin
    funds it."""
    resp = await client.post("/v1/accounts", json={"currency": "USD", "kind": kind},
                             headers=headers)
    assert resp.status_code == 201, resp.text
    account_id = str(resp.json()["id"])
    if deposit:
        dep = await client.post(f"/v1/accounts/{account_id}/deposits", json={"amount": deposit})
        assert dep.status_code == 201, dep.text
    return account_id


@pytest.mark.integration
async def test_endpoint_routes_belong_to_their_principal(settings: RegionSettings) -> None:
    async with node(settings) as (client, db):
        a_id, a = await merchant(client, "shop a")
        _, b = await merchant(client, "shop b")
        resp = await client.post("/v1/webhook_endpoints", headers=a,
                                 json={"url": "http://127.0.0.1:9/a",
                                       "event_types": ["payment.succeeded", "order.*"]})
        assert resp.status_code == 201, resp.text
        created = resp.json()
        assert created["secret"].startswith("whsec_") and created["principal"] == a_id
        assert created["receives_all"] is False
        assert created["event_types"] == ["order.*", "payment.succeeded"]
        ep = created["id"]

        listed = (await client.get("/v1/webhook_endpoints", headers=a)).json()["data"]
        assert [e["id"] for e in listed] == [ep] and "secret" not in listed[0]
        assert (await client.get("/v1/webhook_endpoints", headers=b)).json()["data"] == []
        assert (await client.get(f"/v1/webhook_endpoints/{ep}", headers=a)).status_code == 200

        # Another principal: 403 on every route of the endpoint, and nothing changes.
        for method, path in (("GET", ""), ("GET", "/deliveries"), ("POST", "/rotate_secret"),
                             ("DELETE", "")):
            resp = await client.request(method, f"/v1/webhook_endpoints/{ep}{path}", headers=b)
            assert resp.status_code == 403, (method, path, resp.text)
            assert resp.json()["error"]["type"] == "permission_error"
            assert "whsec_" not in resp.text
        # No key at all: 401.
        resp = await client.get("/v1/webhook_endpoints", headers={"Authorization": ""})
        assert resp.status_code == 401
        # The admin sees it, and everyone's.
        assert (await client.get(f"/v1/webhook_endpoints/{ep}")).status_code == 200
        assert ep in [e["id"] for e in (await client.get("/v1/webhook_endpoints")).json()["data"]]

        rotated = await client.post(f"/v1/webhook_endpoints/{ep}/rotate_secret", headers=a,
                                    json={"expire_old_after_seconds": 60})
        assert rotated.status_code == 200, rotated.text
        assert rotated.json()["secret"] not in (created["secret"],)
        assert rotated.json()["previous_secrets_expire_at"]

        # No Idempotency-Key where a secret is shown: a stored replay would keep it.
        for path in ("", f"/{ep}/rotate_secret"):
            resp = await client.post(f"/v1/webhook_endpoints{path}",
                                     headers={**a, "Idempotency-Key": "k1"},
                                     json={"url": "http://127.0.0.1:9/a"} if not path else {})
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["code"] == "idempotency_not_supported"

        deleted = await client.delete(f"/v1/webhook_endpoints/{ep}", headers=a)
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True

        # The audit trail: one row per change (with the endpoint, never a secret), and the
        # other principal's refusals.
        async with db.engine.connect() as conn:
            trail = (await conn.execute(sa.text(
                "select action, resource, status from audit_log where action like "
                "'webhooks.%' order by id"))).all()
            dump = str((await conn.execute(sa.text("select * from audit_log"))).all())
        changes = [(t.action, t.status) for t in trail if t.resource == ep and t.status < 300]
        assert changes == [("webhooks.create_endpoint", 201), ("webhooks.rotate_secret", 200),
                           ("webhooks.delete_endpoint", 200)], trail
        assert sum(1 for t in trail if t.status == 403) >= 4
        assert "whsec_" not in dump
        assert (await client.get(f"/v1/webhook_endpoints/{ep}", headers=a)).status_code == 404
        assert (await client.get("/v1/webhook_endpoints", headers=a)).json()["data"] == []
        missing = await client.get("/v1/webhook_endpoints/not-an-id", headers=a)
        assert missing.status_code == 404


@pytest.mark.integration
@pytest.mark.parametrize("body", [
    {"url": "ftp://127.0.0.1/x"}, {"url": "127.0.0.1:8000/hook"}, {"url": "http:///nohost"},
    {"url": "http://user:pw@127.0.0.1/x"}, {"url": "http://127.0.0.1:99999/x"},
    {"url": "http://127.0.0.1/x", "event_types": []},
    {"url": "http://127.0.0.1/x", "event_types": ["refund.created"]},  # no such event
    {"url": "http://127.0.0.1/x", "event_types": ["payment.succeeded; drop"]},
    {"url": "http://127.0.0.1/x", "secret": "mine"},
])
async def test_endpoint_registration_is_validated(settings: RegionSettings,
                                                  body: dict[str, Any]) -> None:
    async with node(settings) as (client, _db):
        resp = await client.post("/v1/webhook_endpoints", json=body)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["type"] == "invalid_request_error"
        assert (await client.get("/v1/webhook_endpoints")).json()["data"] == []


@pytest.mark.integration
async def test_endpoints_get_the_events_of_their_principal_only(
        settings: RegionSettings) -> None:
    async with receiver() as rec, node(settings) as (client, _db):
        _, a = await merchant(client, "shop a")
        _, b = await merchant(client, "shop b")
        secrets = {}
        for name, headers in (("a", a), ("b", b), ("admin", {})):
            resp = await client.post("/v1/webhook_endpoints", headers=headers,
                                     json={"url": f"{rec.url}/{name}"})
            assert resp.status_code == 201, resp.text
            secrets[name] = (resp.json()["id"], resp.json()["secret"])
        a_payer = await own_account(client, a, deposit=1000, kind="customer")
        b_payer = await own_account(client, b, deposit=1000, kind="customer")
        b_payee = await own_account(client, b)
        a_to_b = await pay(client, a_payer, b_payee)
        b_to_b = await pay(client, b_payer, b_payee)
        await wait_until(lambda: len(rec.by_path("/admin")) == 2 and len(rec.by_path("/b")) == 2
                         and len(rec.by_path("/a")) >= 1, "events at every endpoint")
        await drained(settings.database_url)  # a wrongly routed event would be in by now

        def payments_at(path: str) -> list[str]:
            return sorted(json.loads(r.body)["data"]["id"] for r in rec.by_path(path))
        assert payments_at("/a") == [a_to_b]
        assert payments_at("/b") == sorted([a_to_b, b_to_b])
        assert payments_at("/admin") == sorted([a_to_b, b_to_b])
        for name in ("a", "b", "admin"):
            for got in rec.by_path(f"/{name}"):
                verify(got.body, got.headers[SIGNATURE_HEADER], secrets[name][1])

        # The attempt log through the API, for the endpoint's own principal.
        ep_a = secrets["a"][0]
        deadline = time.monotonic() + WAIT
        while True:
            resp = await client.get(f"/v1/webhook_endpoints/{ep_a}/deliveries", headers=a)
            assert resp.status_code == 200, resp.text
            log = resp.json()["data"]
            if log and log[0]["status"] == "delivered":
                break
            assert time.monotonic() < deadline, log
            await asyncio.sleep(0.05)
        assert len(log) == 1 and log[0]["event_type"] == "payment.succeeded"
        # The log lists every attempt in order and ends with the 200. An earlier attempt
        # may have timed out on a starved machine (once: (1, None, "retrying")); what
        # the endpoint's principal must see is each of them, numbered, and no other.
        attempts = [(x["attempt"], x["status_code"], x["outcome"]) for x in log[0]["attempts"]]
        assert attempts[-1] == (len(attempts), 200, "delivered"), attempts
        assert [a[0] for a in attempts] == list(range(1, len(attempts) + 1)), attempts
        assert all(outcome == "retrying" for _, _, outcome in attempts[:-1]), attempts


@pytest.mark.integration
async def test_order_events_reach_the_parties_that_subscribed(settings: RegionSettings) -> None:
    async with receiver() as rec, node(settings) as (client, _db):
        _, a = await merchant(client, "buyer a")
        _, b = await merchant(client, "seller b")
        for name, headers, types in (("a", a, ["order.*"]), ("b", b, ["order.confirmed"])):
            resp = await client.post("/v1/webhook_endpoints", headers=headers,
                                     json={"url": f"{rec.url}/{name}", "event_types": types})
            assert resp.status_code == 201, resp.text
        sku = await client.post("/v1/skus", json={"sku": "WH-1", "stock": 10})
        assert sku.status_code == 201, sku.text
        payer = await own_account(client, a, deposit=1000, kind="customer")
        payee = await own_account(client, b)
        order = await client.post("/v1/orders", headers=a, json={
            "sku": "WH-1", "quantity": 2, "payer": payer, "payee": payee, "amount": 300,
            "currency": "USD"})
        assert order.status_code == 201, order.text
        await wait_until(lambda: rec.by_path("/a") and rec.by_path("/b"), "order events")
        await drained(settings.database_url)
        for path in ("/a", "/b"):
            events = [json.loads(r.body) for r in rec.by_path(path)]
            assert [(e["type"], e["data"]["id"]) for e in events] == [
                ("order.confirmed", order.json()["id"])], (path, events)
            assert events[0]["data"]["payment"]["payer"] == payer


@pytest.mark.integration
async def test_refund_events_reach_the_parties_that_subscribed(
        settings: RegionSettings) -> None:
    async with receiver() as rec, node(settings) as (client, _db):
        _, a = await merchant(client, "refunded buyer a")
        _, b = await merchant(client, "refunding seller b")
        _, c = await merchant(client, "bystander c")
        for name, headers, types in (("a", a, ["refund.*"]), ("b", b, ["refund.succeeded"]),
                                     ("c", c, ["refund.*"])):
            resp = await client.post("/v1/webhook_endpoints", headers=headers,
                                     json={"url": f"{rec.url}/{name}", "event_types": types})
            assert resp.status_code == 201, resp.text
        payer = await own_account(client, a, deposit=1000, kind="customer")
        payee = await own_account(client, b)
        pid = await pay(client, payer, payee)
        refund = await client.post(f"/v1/payments/{pid}/refunds", headers=b,
                                   json={"amount": 40})
        assert refund.status_code == 201, refund.text
        await wait_until(lambda: rec.by_path("/a") and rec.by_path("/b"), "refund events")
        await asyncio.sleep(0.3)  # a wrongly routed event would arrive by now
        for path in ("/a", "/b"):
            events = [json.loads(r.body) for r in rec.by_path(path)]
            assert [(e["type"], e["data"]["id"], e["data"]["amount"]) for e in events] == [
                ("refund.succeeded", refund.json()["id"], 40)], (path, events)
            assert (events[0]["data"]["payer"], events[0]["data"]["payee"]) == (payer, payee)
        assert rec.by_path("/c") == [], "not a party to the refund"


@pytest.mark.integration
async def test_deleted_endpoint_gets_nothing_more(settings: RegionSettings) -> None:
    async with receiver() as rec, node(settings) as (client, _db):
        resp = await client.post("/v1/webhook_endpoints", json={"url": rec.url + "/del"})
        ep = resp.json()["id"]
        payer = await open_account(client, deposit=1000)
        payee = await open_account(client, kind="merchant")
        await pay(client, payer, payee)
        await wait_until(lambda: len(rec.by_path("/del")) == 1, "the first event")
        assert (await client.delete(f"/v1/webhook_endpoints/{ep}")).status_code == 200
        await pay(client, payer, payee)
        # A second endpoint registered after the deletion proves the worker has moved on
        # (it may get the second payment's event too: fan-out runs after the commit).
        await client.post("/v1/webhook_endpoints", json={"url": rec.url + "/after"})
        last = await pay(client, payer, payee)
        await wait_until(lambda: last in {json.loads(r.body)["data"]["id"]
                                          for r in rec.by_path("/after")},
                         "the last event at the new endpoint")
        assert len(rec.by_path("/del")) == 1


# --------------------------------------------------------------------------- two regions

@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two replicating regions (us-east, eu-west) for this module, stopped even on failure."""
    cluster = start_cluster(tmp_path_factory.mktemp("webhook-lab"), regions=2, wan_scale=0.2,
                            extra_env={"PAYCLUSTER_TRANSFER_POLL_SECONDS": "0.1"})
    try:
        yield cluster
    finally:
        cluster.stop()


def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return [tuple(r) for r in conn.execute(query).fetchall()]


@pytest.mark.integration
@pytest.mark.multiregion
@pytest.mark.slow
async def test_each_event_is_delivered_once_by_the_region_that_produced_it(
        lab: Cluster) -> None:
    regions = ["us-east", "eu-west"]
    dsn = {r: lab.region(r).servers.postgres.dsn("paycluster") for r in regions}
    headers = lab.auth_headers()  # the lab's bootstrap admin, replicated to every region
    async with receiver() as rec, \
            httpx.AsyncClient(base_url=lab.region("us-east").api_url, timeout=30,
                              headers=headers) as us, \
            httpx.AsyncClient(base_url=lab.region("eu-west").api_url, timeout=30,
                              headers=headers) as eu:
        # An admin endpoint registered in us-east; a merchant's endpoint in eu-west.
        admin_ep = (await us.post("/v1/webhook_endpoints",
                                  json={"url": rec.url + "/admin"})).json()
        _, m = await merchant(eu, "eu shop")
        shop_ep = (await eu.post("/v1/webhook_endpoints", headers=m,
                                 json={"url": rec.url + "/shop"})).json()
        await wait_until(lambda: all(
            _rows(dsn[r], "select count(*) from webhook_endpoints")[0][0] == 2
            for r in regions), "both endpoints in both regions")
        shop_account = await own_account(eu, m)  # homed in eu-west, owned by the merchant
        await wait_until(lambda: _rows(dsn["us-east"], "select count(*) from accounts where "
                                       f"id = '{shop_account}'")[0][0] == 1,
                         "the shop's account replicated to us-east")
        clients = {"us-east": us, "eu-west": eu}
        payees = {r: await open_account(c, kind="merchant", home_region=r)
                  for r, c in clients.items()}
        targets = (payees["us-east"], payees["eu-west"], shop_account)
        groups = [(r, t, await open_account(c, deposit=10_000, home_region=r))
                  for r, c in clients.items() for t in targets]

        # Local and cross-region payments, each written by its payer's region: one payer
        # per group, its payments one after another (no hot payer row).
        async def group(region: str, target: str, payer: str) -> list[str]:
            return [await pay(clients[region], payer, target, 10) for _ in range(5)]
        paid = await asyncio.gather(*(group(*g) for g in groups))
        to_shop = {p for g, ps in zip(groups, paid, strict=True) if g[1] == shop_account
                   for p in ps}

        def outbox_ids() -> set[str]:
            return {str(r[0]) for reg in regions
                    for r in _rows(dsn[reg], "select id from outbox")}

        # Every event of both regions' outboxes reaches the admin endpoint exactly once.
        await wait_until(lambda: set(rec.event_ids("/admin")) == outbox_ids()
                         and _rows(dsn["us-east"], "select count(*) from payments where "
                                   "status = 'processing'")[0][0] == 0
                         and _rows(dsn["eu-west"], "select count(*) from payments where "
                                   "status = 'processing'")[0][0] == 0,
                         "every event at the admin endpoint", within=90)
        for reg in regions:  # a duplicate from the other region would be in by now
            await drained(dsn[reg])
        ids = rec.event_ids("/admin")
        assert len(ids) == len(set(ids)) == len(outbox_ids())
        by_region = Counter(json.loads(r.body)["region"] for r in rec.by_path("/admin"))
        assert set(by_region) == set(regions), by_region
        # The merchant gets the events of payments to its account only, from both regions.
        shop_payments = {json.loads(r.body)["data"]["id"] for r in rec.by_path("/shop")}
        assert shop_payments == to_shop
        shop_ids = rec.event_ids("/shop")
        assert len(shop_ids) == len(set(shop_ids))

        # The attempt log is readable in either region once replicated; zero conflicts.
        def log_complete() -> bool:
            return all(_rows(dsn[r], "select count(*) from webhook_attempts where endpoint_id"
                             f" = '{admin_ep['id']}' and outcome = 'delivered'")[0][0]
                       == len(ids) for r in regions)
        await wait_until(log_complete, "the attempt log replicated", within=60)
        log = (await eu.get(f"/v1/webhook_endpoints/{admin_ep['id']}/deliveries",
                            params={"limit": 100})).json()["data"]
        assert {d["region"] for d in log} == set(regions)
        assert all(d["status"] == "delivered" for d in log)
        assert shop_ep["id"] != admin_ep["id"]
        for r in regions:
            conflicts = _rows(dsn[r], "select coalesce(sum(confl_insert_exists + "
                              "confl_update_origin_differs + confl_update_missing + "
                              "confl_delete_missing), 0), coalesce(sum(apply_error_count), 0) "
                              "from pg_stat_subscription_stats")
            assert conflicts == [(0, 0)], (r, conflicts)
