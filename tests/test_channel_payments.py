"""Pay-ins and payouts through the channel (the acquirer simulator), end to end: a real
node served over HTTP on 127.0.0.1 (so the real channel process can call it back), its
real PostgreSQL, Redis and NATS, and the channel's own fault injection.

Timings are squeezed: an operation is stuck after 1 s, queried on a 0.4/0.4/0.8 s
schedule, then given up; the breaker opens after 3 failures for 1.5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn

from channel.client import ChannelAdmin, ChannelClient
from channel.signing import SIGNATURE_HEADER, sign
from cluster.servers import ChannelServer, RegionServers, free_port
from region_node.__main__ import KEEP_ALIVE_SECONDS
from region_node.app import create_app
from region_node.channel_config import ChannelLinkSettings
from region_node.config import RegionSettings
from tests.channel_fixtures import start_test_channel
from tests.conftest import auth_headers, region_settings
from tests.helpers import check_ledger, open_account

pytestmark = pytest.mark.integration

APPROVED = "4242424242424242"
DECLINED = "4000000000000002"
PAID_ACCOUNT = "000123456789"
RETURNED_ACCOUNT = "000111111116"
CARD = {"number": APPROVED, "exp_month": 12, "exp_year": 2035, "cvc": "123"}


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (pytest owns the process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def link_settings(channel: ChannelServer, port: int, **overrides: Any) -> ChannelLinkSettings:
    """A node's channel settings for the tests' squeezed timings."""
    values: dict[str, Any] = {
        "url": channel.url, "api_key": channel.api_key,
        "callback_secret": channel.callback_secret,
        "callback_url": f"http://127.0.0.1:{port}/v1/channel/callbacks",
        "timeout_seconds": 1.0, "stuck_after_seconds": 1.0, "compensation_seconds": 0.2,
        "retry_schedule_seconds": [0.4, 0.4, 0.8], "queue_poll_seconds": 0.2,
        "breaker_failure_threshold": 3, "breaker_open_seconds": 1.5,
        "run_statement_job": False}
    values.update(overrides)
    return ChannelLinkSettings(**values)


@contextlib.asynccontextmanager
async def http_node(settings: RegionSettings) -> AsyncIterator[httpx.AsyncClient]:
    """The node of `settings` in this process, served over real HTTP on its api_port
    (lifespan and workers running); a client sending the session's admin key."""
    app = create_app(settings)
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=settings.api_port,
                                    lifespan="on", log_config=None, access_log=False,
                                    timeout_keep_alive=KEEP_ALIVE_SECONDS))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 60
    while not server.started:
        assert not task.done(), "node server exited before it started"
        assert time.monotonic() < deadline, "node server did not start"
        await asyncio.sleep(0.05)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api_port}",
                                     headers=auth_headers(), timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def node_settings(servers: RegionServers, db_url: str, channel: ChannelServer,
                  **link: Any) -> RegionSettings:
    """us-east on the session's servers, with a channel link to `channel`."""
    port = free_port()
    return region_settings(servers, db_url, api_port=port,
                           channel=link_settings(channel, port, **link))


async def wait_status(client: httpx.AsyncClient, kind: str, op_id: str,
                      statuses: tuple[str, ...], within: float = 20.0) -> dict[str, Any]:
    """Poll GET /v1/{kind}s/{id} until its status is one of `statuses`."""
    deadline = time.monotonic() + within
    while True:
        resp = await client.get(f"/v1/{kind}s/{op_id}")
        assert resp.status_code == 200, resp.text
        doc: dict[str, Any] = resp.json()
        if doc["status"] in statuses:
            return doc
        assert time.monotonic() < deadline, f"{kind} {op_id} still {doc['status']}"
        await asyncio.sleep(0.05)


async def payin(client: httpx.AsyncClient, account: str, amount: int,
                card: dict[str, Any] | None = None) -> httpx.Response:
    """POST a pay-in."""
    return await client.post(f"/v1/accounts/{account}/payins",
                             json={"amount": amount, "card": card or CARD})


async def payout(client: httpx.AsyncClient, account: str, amount: int,
                 number: str = PAID_ACCOUNT) -> httpx.Response:
    """POST a payout."""
    return await client.post(f"/v1/accounts/{account}/payouts", json={
        "amount": amount, "bank_account": {"account_number": number, "holder_name": "Ada"}})


async def balance(client: httpx.AsyncClient, account: str) -> int:
    """The account's balance."""
    resp = await client.get(f"/v1/accounts/{account}")
    return int(resp.json()["balance"])


def postings(db_url: str, op_id: str) -> list[tuple[str, int]]:
    """(entry_type, amount) of the entries that touched user accounts for an operation."""
    with psycopg.connect(db_url) as conn:
        return [(str(t), int(a)) for t, a in conn.execute(
            "select e.entry_type, e.amount from journal_entries e join accounts a "
            "on a.id = e.account_id where e.payment_id = %s and a.kind in "
            "('customer', 'merchant') order by e.id", (op_id,)).fetchall()]


def system_balances(db_url: str) -> dict[str, int]:
    """Balance per system account kind."""
    with psycopg.connect(db_url) as conn:
        return {str(k): int(v) for k, v in conn.execute(
            "select kind, sum(balance)::bigint from accounts where kind not in "
            "('customer', 'merchant') group by kind").fetchall()}


@pytest.fixture
async def own_channel(tmp_path: Path) -> AsyncIterator[ChannelServer]:
    """A channel of this test alone (its statement holds only this test's operations)."""
    server = start_test_channel(tmp_path / "channel")
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- pay-ins, payouts


async def test_payins_and_payouts_settle_once_through_callbacks(
        servers: RegionServers, db_url: str, channel_server: ChannelServer,
        channel_admin: ChannelAdmin) -> None:
    """An approved card credits the account once, even with every callback sent twice; a
    declined card credits nothing; a payout debits at once and is paid, or returned with
    the money back; no card number is stored anywhere."""
    await channel_admin.set_faults(seed=1, callback_duplicate=1.0)
    async with http_node(node_settings(servers, db_url, channel_server)) as client:
        acc = await open_account(client, "EUR")
        resp = await payin(client, acc, 10_000)
        assert resp.status_code == 201, resp.text
        doc = resp.json()
        assert doc["card"] == {"last4": "4242", "brand": "visa"}
        done = await wait_status(client, "payin", doc["id"], ("succeeded",))
        assert done["settled_by"] in ("callback", "send")
        declined = (await payin(client, acc, 500, {**CARD, "number": DECLINED})).json()
        failed = await wait_status(client, "payin", declined["id"], ("failed",))
        assert failed["failure_code"] == "card_declined"
        # Both callbacks of every event arrived (duplicates): still one credit.
        async with ChannelAdmin(channel_server.admin_url, channel_server.admin_key) as adm:
            cbs = await adm.callbacks(doc["id"])
        assert cbs, "the channel sent callbacks"
        assert await balance(client, acc) == 10_000
        assert postings(db_url, doc["id"]) == [("payin", 10_000)]
        assert postings(db_url, declined["id"]) == []

        out = (await payout(client, acc, 3_000)).json()
        assert out["status"] in ("pending", "paid")
        assert await balance(client, acc) == 7_000  # debited at once
        await wait_status(client, "payout", out["id"], ("paid",))
        back = (await payout(client, acc, 2_000, RETURNED_ACCOUNT)).json()
        returned = await wait_status(client, "payout", back["id"], ("returned",))
        assert returned["failure_code"] == "account_closed"
        assert await balance(client, acc) == 7_000
        too_much = await payout(client, acc, 1_000_000)
        assert too_much.status_code == 402
        bad = await payin(client, acc, 100, {**CARD, "number": "4242424242424241"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "incorrect_number"
        assert "4242424242424241" not in bad.text
    check_ledger(db_url).assert_sound()
    sys_bal = system_balances(db_url)
    assert sys_bal.get("payout", 0) == 0  # nothing left on its way out
    assert sys_bal["channel"] == -10_000 + 3_000  # in by card, out by the paid payout
    with psycopg.connect(db_url) as conn:
        for table in ("channel_operations", "idempotency_keys", "outbox", "audit_log",
                      "channel_callbacks"):
            dump = str(conn.execute(f"select * from {table}").fetchall())
            assert APPROVED not in dump and DECLINED not in dump, table


async def test_callbacks_verified_idempotent_monotonic_and_forwarded(
        servers: RegionServers, channel_server: ChannelServer,
        channel_admin: ChannelAdmin) -> None:
    """A callback with a bad signature is refused; the same event twice is applied once;
    an older version never moves an operation back; a callback reaching the wrong region
    is forwarded over gRPC to the owner, which applies it."""
    from tests.conftest import two_regions

    await channel_admin.set_faults(seed=2, callback_drop=1.0)  # we deliver them ourselves
    link = link_settings(channel_server, 1, stuck_after_seconds=3600.0)
    async with two_regions(servers, channel=link) as (a, b, db_a, _db_b, _ports):
        acc = await open_account(a, "EUR")
        doc = (await payin(a, acc, 4_200)).json()
        ref = doc["id"]
        async with httpx.AsyncClient(base_url=channel_server.url, headers={
                "Authorization": f"Bearer {channel_server.api_key}"}) as ch:
            deadline = time.monotonic() + 10
            while (data := (await ch.get(f"/v1/operations/{ref}")).json())["status"] != \
                    "captured":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        event = {"id": f"evt_{uuid.uuid4().hex}", "type": "payment.captured", "data": data}
        raw = json.dumps(event).encode()

        def headers(body: bytes, secret: str = channel_server.callback_secret) -> dict[str, str]:
            return {SIGNATURE_HEADER: sign(body, secret), "content-type": "application/json"}

        async with httpx.AsyncClient(transport=b._transport, base_url="http://node") as anon:
            bad = await anon.post("/v1/channel/callbacks", content=raw,
                                  headers=headers(raw, "chsec_wrong"))
            assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_signature"
            # eu-west does not own the account (us-east): it forwards to us-east.
            first = await anon.post("/v1/channel/callbacks", content=raw, headers=headers(raw))
            assert first.status_code == 200, first.text
            assert first.json()["outcome"] == "settled"
            assert first.headers.get("paycluster-served-by") == "us-east"
            again = await anon.post("/v1/channel/callbacks", content=raw, headers=headers(raw))
            assert again.json()["outcome"] == "duplicate"
            older = {"id": f"evt_{uuid.uuid4().hex}", "type": "payment.pending",
                     "data": {**data, "status": "pending", "version": 1}}
            raw_old = json.dumps(older).encode()
            stale = await anon.post("/v1/channel/callbacks", content=raw_old,
                                    headers=headers(raw_old))
            assert stale.json()["outcome"] == "stale"
        assert (await a.get(f"/v1/payins/{ref}")).json()["status"] == "succeeded"
        assert await balance(a, acc) == 4_200
        assert postings(db_a, ref) == [("payin", 4_200)]


def findings(db_url: str) -> list[Any]:
    """The ledger invariants of cluster.invariants that fail (replication ones aside: a
    single region has no subscriptions)."""
    from cluster.invariants import ledger_findings

    return [f for f in ledger_findings("us-east", db_url) if not f.ok]


def settle_seconds(db_url: str, op_id: str) -> float:
    """How long an operation took from creation to settlement."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select extract(epoch from settled_at - created_at) from "
                           "channel_operations where id = %s", (op_id,)).fetchone()
    assert row is not None and row[0] is not None
    return float(row[0])


# --------------------------------------------------------------------------- compensation


async def test_compensation_settles_payments_whose_callbacks_were_lost(
        servers: RegionServers, db_url: str, channel_server: ChannelServer,
        channel_admin: ChannelAdmin) -> None:
    """Every callback is dropped: the compensation job asks the channel's status API once
    an operation is stuck past the threshold and settles it from the answer, once."""
    await channel_admin.set_faults(seed=3, callback_drop=1.0)
    async with http_node(node_settings(servers, db_url, channel_server)) as client:
        acc = await open_account(client, "EUR")
        pin = (await payin(client, acc, 8_000)).json()
        early = await payout(client, acc, 1_000, PAID_ACCOUNT)
        assert early.status_code == 402  # nothing to pay out until the pay-in settles
        done = await wait_status(client, "payin", pin["id"], ("succeeded",))
        assert done["settled_by"] == "sync"
        pout = (await payout(client, acc, 1_000, PAID_ACCOUNT)).json()
        paid = await wait_status(client, "payout", pout["id"], ("paid",))
        assert paid["settled_by"] == "sync"
        assert await balance(client, acc) == 7_000
    took = [settle_seconds(db_url, pin["id"]), settle_seconds(db_url, pout["id"])]
    # Stuck after 1 s, then the first query (the job polls every 0.2 s).
    assert all(1.0 <= t < 5.0 for t in took), took
    print(f"\nstuck operations settled by the status API after {took} s")
    assert postings(db_url, pin["id"]) == [("payin", 8_000)]
    assert findings(db_url) == []


async def test_compensation_gives_up_once_and_a_late_success_becomes_an_item(
        servers: RegionServers, db_url: str, channel_server: ChannelServer,
        channel_admin: ChannelAdmin) -> None:
    """The channel takes a pay-in and a payout, then goes down past the whole retry
    schedule and holds back its callbacks: both fail with channel_timeout and are
    reversed (the payout's money comes back) exactly once. When the channel's late
    'captured' and 'paid' arrive, no money moves: each becomes a reconciliation item."""
    await channel_admin.set_faults(seed=4, callback_delay=1.0, callback_delay_seconds=9.0)
    # Stuck after 3 s: the outage must be in force before the first status query.
    async with http_node(node_settings(servers, db_url, channel_server,
                                       stuck_after_seconds=3.0)) as client:
        acc = await open_account(client, "EUR", deposit=5_000)
        pin = (await payin(client, acc, 2_500)).json()
        pout = (await payout(client, acc, 1_500, PAID_ACCOUNT)).json()
        assert pin["status"] == "pending" and pout["status"] == "pending"
        # 503 rather than a closed port: a pooled keep-alive connection may outlive the
        # listener's close for a moment, and this test needs every query to fail.
        await channel_admin.down(7.0, mode="503")
        t0 = time.monotonic()
        failed_in = await wait_status(client, "payin", pin["id"], ("failed", "succeeded"))
        failed_out = await wait_status(client, "payout", pout["id"], ("failed", "paid"))
        gave_up_after = time.monotonic() - t0
        assert (failed_in["status"], failed_in["failure_code"]) == \
            ("failed", "channel_timeout"), (failed_in, gave_up_after)
        assert (failed_out["status"], failed_out["failure_code"]) == \
            ("failed", "channel_timeout")
        assert await balance(client, acc) == 5_000  # the payout's money is back
        await channel_admin.up()
        # The held-back callbacks arrive after our reversal.
        deadline = time.monotonic() + 20
        while True:
            with psycopg.connect(db_url) as conn:
                outcomes = sorted(str(r[0]) for r in conn.execute(
                    "select outcome from channel_callbacks where outcome = "
                    "'late_after_reversal'").fetchall())
            if len(outcomes) >= 2:
                break
            assert time.monotonic() < deadline, outcomes
            await asyncio.sleep(0.1)
        items = (await client.get("/v1/admin/reconciliation")).json()["items"]
        late = sorted((i["item_kind"], i["detail"]["operation_id"]) for i in items)
        assert late == sorted([("channel_late_success", pin["id"]),
                               ("channel_late_success", pout["id"])])
        assert (await client.get(f"/v1/payins/{pin['id']}")).json()["status"] == "failed"
        assert await balance(client, acc) == 5_000
        metrics = (await client.get("/metrics")).text
        assert ('paycluster_channel_reconciliation_open_items{item_kind='
                '"channel_late_success",region="us-east"} 2.0') in metrics
    print(f"\ngave up (channel_timeout, reversed) {gave_up_after:.1f} s into the outage")
    assert postings(db_url, pin["id"]) == []
    assert postings(db_url, pout["id"]) == [("payout", -1_500), ("payout_returned", 1_500)]
    assert findings(db_url) == []


# --------------------------------------------------------------------------- breaker, degradation


async def test_breaker_opens_and_closes_while_the_channel_is_down(
        servers: RegionServers, db_url: str, channel_server: ChannelServer,
        channel_admin: ChannelAdmin) -> None:
    """Channel down: calls fail until the breaker opens; then a pay-in is a quick 503 with
    Retry-After, a payout queues (money already set aside), payments inside the ledger go
    on, readiness says degraded and the gauge says open. Channel back: after the open
    period a trial call closes the breaker and the queued payout goes out and is paid."""
    await channel_admin.down(60.0, mode="503")
    async with http_node(node_settings(servers, db_url, channel_server)) as client:
        acc = await open_account(client, "EUR", deposit=10_000)
        other = await open_account(client, "EUR")
        unknown = []
        for _ in range(3):  # the breaker's threshold
            resp = await payin(client, acc, 100)
            assert resp.status_code == 201 and resp.json()["status"] == "pending"
            unknown.append(resp.json()["id"])
        t0 = time.monotonic()
        refused = await payin(client, acc, 100)
        quick = time.monotonic() - t0
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "channel_unavailable"
        assert int(refused.headers["retry-after"]) >= 1
        assert quick < 0.5, quick
        queued = await payout(client, acc, 2_500)
        assert queued.status_code == 201 and queued.json()["status"] == "queued"
        assert await balance(client, acc) == 7_500
        pay = await client.post("/v1/payments", json={"payer": acc, "payee": other,
                                                      "amount": 500, "currency": "EUR"})
        assert pay.status_code == 201 and pay.json()["status"] == "succeeded"
        ready = (await client.get("/health/ready")).json()
        assert ready["status"] == "degraded" and ready["checks"]["channel"] == "breaker open"
        assert "paycluster_channel_breaker_state{region=\"us-east\"} 2.0" in \
            (await client.get("/metrics")).text

        await channel_admin.up()
        done = await wait_status(client, "payout", queued.json()["id"], ("paid",), within=30)
        assert done["settled_by"] in ("send", "callback", "sync")
        ready = (await client.get("/health/ready")).json()
        assert ready["status"] == "ready" and ready["channel"]["breaker"] == "closed"
        assert "paycluster_channel_breaker_state{region=\"us-east\"} 0.0" in \
            (await client.get("/metrics")).text
        # The pay-ins the channel never got fail once the schedule is over: nothing moved.
        for op_id in unknown:
            failed = await wait_status(client, "payin", op_id, ("failed",), within=30)
            assert failed["failure_code"] == "channel_timeout"
        assert (await payin(client, acc, 300)).status_code == 201
    check_ledger(db_url).assert_sound()
    assert findings(db_url) == []


async def test_redis_down_pay_ins_and_payouts_keep_working(
        servers: RegionServers, db_url: str, channel_server: ChannelServer,
        channel_admin: ChannelAdmin, tmp_path: Path) -> None:
    """Redis down (our own instance, stopped by pid): pay-ins and payouts still settle,
    an Idempotency-Key still replays (SQL holds the truth), readiness says degraded with
    the Redis check failed."""
    from cluster.servers import start_redis

    redis = start_redis(tmp_path / "redis")
    try:
        settings = node_settings(servers, db_url, channel_server).model_copy(
            update={"redis_url": redis.url})
        async with http_node(settings) as client:
            acc = await open_account(client, "EUR")
            redis.stop()
            ready = (await client.get("/health/ready")).json()
            assert ready["status"] == "degraded" and ready["checks"]["redis"] != "ok"
            key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
            body = {"amount": 1_200, "card": CARD}
            first = await client.post(f"/v1/accounts/{acc}/payins", json=body, headers=key)
            assert first.status_code == 201, first.text
            again = await client.post(f"/v1/accounts/{acc}/payins", json=body, headers=key)
            assert again.headers.get("idempotent-replayed") == "true"
            assert again.json()["id"] == first.json()["id"]
            await wait_status(client, "payin", first.json()["id"], ("succeeded",))
            out = (await payout(client, acc, 200)).json()
            await wait_status(client, "payout", out["id"], ("paid",))
            assert await balance(client, acc) == 1_000
    finally:
        redis.stop()
    assert findings(db_url) == []


async def test_nats_down_money_still_moves_and_events_wait_in_the_outbox(
        servers: RegionServers, db_url: str, channel_server: ChannelServer,
        channel_admin: ChannelAdmin, tmp_path: Path) -> None:
    """NATS down (our own instance, stopped by pid): pay-ins and payouts settle, their
    events wait in the outbox (nothing lost), readiness says degraded with the bus
    check failed."""
    from cluster.servers import start_nats

    nats = start_nats(tmp_path / "nats")
    try:
        settings = node_settings(servers, db_url, channel_server).model_copy(
            update={"nats_url": nats.url})
        async with http_node(settings) as client:
            acc = await open_account(client, "EUR")
            nats.stop()
            deadline = time.monotonic() + 20
            while (ready := (await client.get("/health/ready")).json())["checks"]["bus"] == "ok":
                assert time.monotonic() < deadline, ready
                await asyncio.sleep(0.1)
            assert ready["status"] == "degraded"
            pin = (await payin(client, acc, 900)).json()
            await wait_status(client, "payin", pin["id"], ("succeeded",))
            out = (await payout(client, acc, 400)).json()
            await wait_status(client, "payout", out["id"], ("paid",))
            with psycopg.connect(db_url) as conn:
                waiting = {str(r[0]) for r in conn.execute(
                    "select event_type from outbox where published_at is null").fetchall()}
            assert {"payin.succeeded", "payout.paid"} <= waiting
    finally:
        nats.stop()
    assert findings(db_url) == []


async def test_peer_region_down_own_accounts_keep_working(
        servers: RegionServers, channel_server: ChannelServer,
        channel_admin: ChannelAdmin) -> None:
    """eu-west down: us-east still takes pay-ins and payouts for its own accounts and
    their callbacks; a pay-in for an eu-west account through us-east is a clear 503
    region_unavailable, and nothing is written for it."""
    from tests.conftest import app_client, fresh_database, tls_overrides

    ports = {"us-east": free_port(), "eu-west": free_port()}
    with fresh_database(servers) as db_a, fresh_database(servers) as db_b:
        port_a = free_port()
        sa_ = region_settings(servers, db_a, region="us-east", grpc_port=ports["us-east"],
                              api_port=port_a,
                              peers={"eu-west": f"127.0.0.1:{ports['eu-west']}"},
                              channel=link_settings(channel_server, port_a),
                              **tls_overrides(servers, "us-east"))
        sb = region_settings(servers, db_b, region="eu-west", grpc_port=ports["eu-west"],
                             peers={"us-east": f"127.0.0.1:{ports['us-east']}"},
                             **tls_overrides(servers, "eu-west"))
        async with http_node(sa_) as a:
            async with app_client(sb) as b:
                remote = await open_account(b, "EUR")
            # eu-west is gone (its gRPC server and app stopped).
            acc = await open_account(a, "EUR")
            pin = (await payin(a, acc, 700)).json()
            await wait_status(a, "payin", pin["id"], ("succeeded",))
            out = (await payout(a, acc, 300)).json()
            await wait_status(a, "payout", out["id"], ("paid",))
            lost = await payin(a, remote, 700)
            assert lost.status_code == 503, lost.text
            assert lost.json()["error"]["code"] == "region_unavailable"
        with psycopg.connect(db_a) as conn:
            assert conn.execute("select count(*) from channel_operations").fetchone() == (2,)
        assert findings(db_a) == []


# --------------------------------------------------------------------------- statements


async def test_statement_reconciliation_fixes_once_and_lists_the_rest(
        servers: RegionServers, db_url: str, own_channel: ChannelServer,
        tmp_path: Path) -> None:
    """The day's statement against our operations: matched rows post their fee once; a
    capture we were still waiting for (its callbacks lost) is settled from the statement;
    each injected difference (amount, status, a row left out, a row we never had) becomes
    exactly one reconciliation item. A second run fixes nothing twice and lists nothing
    new; the CLI prints the report and writes JSON and markdown."""
    from typer.testing import CliRunner

    from cluster.cli import app as cli
    from tests.conftest import admin_key

    today = datetime.now(UTC).date()
    async with ChannelAdmin(own_channel.admin_url, own_channel.admin_key) as adm, \
            ChannelClient(own_channel.url, own_channel.api_key) as ch, \
            http_node(node_settings(servers, db_url, own_channel,
                                    stuck_after_seconds=3600.0)) as client:
        acc = await open_account(client, "EUR")
        ids = {}
        for name, amount, card in (("ok", 10_000, APPROVED), ("amount", 2_000, APPROVED),
                                   ("status", 3_000, APPROVED), ("missing", 4_000, APPROVED),
                                   ("declined", 500, DECLINED)):
            ids[name] = (await payin(client, acc, amount, {**CARD, "number": card})).json()["id"]
        for name in ids:
            await wait_status(client, "payin", ids[name], ("succeeded", "failed"))
        ids["paid"] = (await payout(client, acc, 1_000)).json()["id"]
        ids["returned"] = (await payout(client, acc, 700, RETURNED_ACCOUNT)).json()["id"]
        await wait_status(client, "payout", ids["paid"], ("paid",))
        await wait_status(client, "payout", ids["returned"], ("returned",))
        # Its callbacks are lost and the compensation job would wait an hour.
        await adm.set_faults(seed=5, callback_drop=1.0)
        ids["waiting"] = (await payin(client, acc, 6_000)).json()["id"]
        deadline = time.monotonic() + 10
        while (await ch.status(ids["waiting"])).status != "captured":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await adm.add_difference(ids["amount"], "amount", amount=2_100)
        await adm.add_difference(ids["status"], "status", status="declined")
        await adm.add_difference(ids["missing"], "missing")
        await adm.add_difference("ext-unknown-1", "extra", amount=999, currency="EUR",
                                 day=today.isoformat())
        statement = await ch.statement(today)
        csv_file = tmp_path / f"statement-{today.isoformat()}.csv"
        csv_file.write_text(await ch.statement_csv(today))

        first = (await client.post("/v1/admin/channel/statement",
                                   json={"day": today.isoformat()})).json()
        assert first["summary"] == {"matched": 4, "fixed": 1, "missing_here": 1,
                                    "missing_at_channel": 1, "amount_mismatch": 1,
                                    "status_mismatch": 1, "skipped": 0}, first["summary"]
        found = sorted((d["category"], d["reference"]) for d in first["differences"])
        assert found == sorted([("amount_mismatch", ids["amount"]),
                                ("status_mismatch", ids["status"]),
                                ("missing_at_channel", ids["missing"]),
                                ("missing_here", "ext-unknown-1")])
        assert [f["reference"] for f in first["fixed"]] == [ids["waiting"]]
        assert first["items_new"] == 4 and first["items_already_listed"] == 0
        fees = {r.reference: r.fee for r in statement}
        expected_fees = sum(fees[ids[n]] for n in ("ok", "paid", "waiting", "declined",
                                                   "returned"))
        assert first["fees_posted"] == {"EUR": expected_fees}
        done = (await client.get(f"/v1/payins/{ids['waiting']}")).json()
        assert (done["status"], done["settled_by"]) == ("succeeded", "statement")

        # Again, from the file through the CLI: nothing fixed or posted twice.
        runner = CliRunner()
        out_json, out_md = tmp_path / "report.json", tmp_path / "report.md"
        result = await asyncio.to_thread(
            runner.invoke, cli, ["reconcile", "statement", "--region", "us-east",
                                 "--file", str(csv_file), "--json", str(out_json),
                                 "--markdown", str(out_md), "--api-url",
                                 str(client.base_url).rstrip("/"), "--key", admin_key()])
        assert result.exit_code == 2, result.output  # differences listed
        second = json.loads(out_json.read_text())
        assert second["summary"]["matched"] == 5 and second["summary"]["fixed"] == 0
        assert second["items_new"] == 0 and second["items_already_listed"] == 4
        assert second["fees_posted"] == {}
        assert "amount_mismatch" in result.output and "ext-unknown-1" in result.output
        assert "| amount_mismatch | 1 |" in out_md.read_text()

        # The operator settles an item with the existing resolutions; the gauge follows.
        items = (await client.get("/v1/admin/reconciliation")).json()["items"]
        extra = next(i for i in items if i["item_kind"] == "statement_missing_here")
        resolved = await client.post("/v1/admin/reconciliation/resolve", json={
            "home_region": extra["home_region"], "takeover_epoch": 0,
            "item_id": extra["item_id"], "resolution": "acknowledge",
            "note": "not ours: the channel corrected its statement"})
        assert resolved.status_code == 201, resolved.text
        # The channel's gauge is read at scrape time; the node-wide reconciliation gauge
        # by a worker every 5 s (region_node/ops_metrics.py), which may have read the item
        # just before it was settled: the series goes at its next refresh (bounded).
        deadline = time.monotonic() + 30
        while "statement_missing_here" in (metrics := (await client.get("/metrics")).text):
            assert time.monotonic() < deadline, "the settled item is still a metric"
            await asyncio.sleep(0.2)
        assert ('paycluster_channel_reconciliation_open_items{item_kind='
                '"statement_amount_mismatch",region="us-east"} 1.0') in metrics
    with psycopg.connect(db_url) as conn:
        fee_total = conn.execute("select -sum(balance) from accounts where kind = 'fees'"
                                 ).fetchone()
    assert fee_total == (expected_fees,)
    assert findings(db_url) == []


# --------------------------------------------------------------------------- the drill

ISSUER_TIMEOUT_CARD = "4000000000000119"
BANK_TIMEOUT_ACCOUNT = "000333333335"
NO_FUNDS_CARD = "4000000000009995"


@pytest.mark.chaos
@pytest.mark.slow
async def test_drill_every_operation_settles_once_and_the_statement_reconciles(
        servers: RegionServers, db_url: str, own_channel: ChannelServer) -> None:
    """The issue's drill: the channel drops 30% of callbacks, duplicates 20%, delays 20% by
    6 s (past the compensation window), fails 10% of calls before acting and 5% after, and
    goes down for 3 s in the middle of the workload (60 pay-ins, 30 payouts over ~7 s). At
    the end every pay-in and payout is settled exactly once (the invariants, and our
    status equals the channel's final one unless we gave up first, which is then a listed
    item), the ledger balances, and
    the statement reconciles: the differences injected on purpose are listed exactly,
    every other one is a give-up the compensation job made during the outage."""
    seed = 15
    today = datetime.now(UTC).date()
    async with ChannelAdmin(own_channel.admin_url, own_channel.admin_key) as adm, \
            ChannelClient(own_channel.url, own_channel.api_key) as ch, \
            http_node(node_settings(servers, db_url, own_channel)) as client:
        await adm.set_faults(seed=seed, callback_drop=0.3, callback_duplicate=0.2,
                             callback_delay=0.2, callback_delay_seconds=6.0,
                             error_rate=0.1, error_after_rate=0.05)
        accounts = [await open_account(client, "EUR", deposit=50_000) for _ in range(8)]
        cards = [APPROVED] * 6 + [DECLINED, NO_FUNDS_CARD, ISSUER_TIMEOUT_CARD]
        banks = [PAID_ACCOUNT] * 4 + [RETURNED_ACCOUNT, BANK_TIMEOUT_ACCOUNT]
        jobs: list[tuple[str, int, int]] = []
        for i in range(60):
            jobs.append(("payin", i % len(accounts), i))
            if i % 2 == 0:
                jobs.append(("payout", (i + 3) % len(accounts), i))
        gate = asyncio.Semaphore(6)
        refused: list[str] = []
        created: dict[str, str] = {}

        async def run(job: tuple[str, int, int]) -> None:
            kind, acc_i, i = job
            await asyncio.sleep(0.12 * i)  # spread over ~7 s: the outage hits the middle
            async with gate:
                if kind == "payin":
                    resp = await payin(client, accounts[acc_i], 1_000 + 37 * i,
                                       {**CARD, "number": cards[i % len(cards)]})
                else:
                    resp = await payout(client, accounts[acc_i], 500 + 11 * i,
                                        banks[i % len(banks)])
            if resp.status_code == 503:
                refused.append(resp.json()["error"]["code"])
                return
            assert resp.status_code == 201, resp.text
            created[resp.json()["id"]] = kind

        async def outage() -> None:
            await asyncio.sleep(3.0)
            await adm.down(3.0, mode="503")

        t0 = time.monotonic()
        await asyncio.gather(outage(), *(run(j) for j in jobs))
        # Quiescence: every operation settled (bounded).
        deadline = time.monotonic() + 120
        while True:
            with psycopg.connect(db_url) as conn:
                left = conn.execute("select count(*) from channel_operations where status "
                                    "in ('queued', 'pending')").fetchone()
            if left == (0,):
                break
            assert time.monotonic() < deadline, f"{left} operations still waiting"
            await asyncio.sleep(0.2)
        settled_after = time.monotonic() - t0
        # The channel's held-back and retried callbacks have all been sent.
        deadline = time.monotonic() + 60
        while any(c.get("outcome") is None for c in await adm.callbacks()):
            assert time.monotonic() < deadline, "callbacks still in flight"
            await asyncio.sleep(0.2)
        fired = (await adm.faults())["fired"]
        await adm.set_faults()  # the statement and the final status queries, undisturbed
        breaker = (await client.get("/v1/admin/channel")).json()
        # The statement below needs four pay-ins that succeeded. How many of the drill's
        # did depends on the machine (on a busy one most time out during the outage and
        # are given up): top up, undisturbed, the ones that are missing.
        with psycopg.connect(db_url) as conn:
            row = conn.execute("select count(*) from channel_operations where kind = "
                               "'payin' and status = 'succeeded'").fetchone()
        for i in range(max(0, 4 - int(row[0] if row else 0))):
            resp = await payin(client, accounts[i], 3_000 + i, {**CARD, "number": APPROVED})
            assert resp.status_code == 201, resp.text
            created[resp.json()["id"]] = "payin"
            await wait_status(client, "payin", resp.json()["id"], ("succeeded",), within=60)

        # Ours against the channel's final word, operation by operation.
        with psycopg.connect(db_url) as conn:
            ours = {str(r[0]): (str(r[1]), r[2], r[3], r[4]) for r in conn.execute(
                "select id, status, failure_code, settled_by, "
                "extract(epoch from settled_at - created_at) from channel_operations")}
            kinds = {str(r[0]): str(r[1]) for r in conn.execute(
                "select id, kind from channel_operations")}
        # A pay-in the breaker stopped between its row and its call was answered 503 and
        # failed at once (the card is not kept to try again).
        assert set(created) <= set(ours)
        assert all(ours[r][:2] == ("failed", "channel_unavailable")
                   for r in set(ours) - set(created))
        created = kinds
        gave_up_then_done: set[str] = set()
        for ref, (status, failure, _by, _took) in ours.items():
            try:
                theirs = (await ch.status(ref)).status
            except Exception:  # 404: the channel never had it
                theirs = None
            from region_node.channel_ops import outcome_of, same_money
            outcome = outcome_of(created[ref], theirs) if theirs else None
            if theirs is None:
                assert status == "failed", (ref, status, failure)
            elif status == "failed" and failure == "channel_timeout" and outcome in (
                    "succeeded", "paid"):
                gave_up_then_done.add(ref)  # we gave up during the outage, then it went
            else:
                assert outcome is not None and same_money(created[ref], status, outcome), \
                    (ref, status, failure, theirs)
        items = (await client.get("/v1/admin/reconciliation")).json()["items"]
        late_items = {i["detail"]["operation_id"] for i in items
                      if i["item_kind"] == "channel_late_success"}
        assert late_items <= gave_up_then_done

        # The statement, with differences injected on purpose.
        succeeded = sorted(r for r, v in ours.items()
                           if v[0] == "succeeded" and created[r] == "payin")
        assert len(succeeded) >= 4, ours
        inject = {"amount": succeeded[0], "status": succeeded[1], "missing": succeeded[2]}
        await adm.add_difference(inject["amount"], "amount", amount=1)
        await adm.add_difference(inject["status"], "status", status="declined")
        await adm.add_difference(inject["missing"], "missing")
        await adm.add_difference("drill-extra-1", "extra", amount=4_242, currency="EUR",
                                 day=today.isoformat())
        report = (await client.post("/v1/admin/channel/statement",
                                    json={"day": today.isoformat()})).json()
        found = {(d["category"], d["reference"]) for d in report["differences"]}
        injected = {("amount_mismatch", inject["amount"]),
                    ("status_mismatch", inject["status"]),
                    ("missing_at_channel", inject["missing"]),
                    ("missing_here", "drill-extra-1")}
        explained = {("status_mismatch", r) for r in gave_up_then_done}
        assert found == injected | explained, found ^ (injected | explained)
        assert report["summary"]["fixed"] == 0  # every operation had settled already
        statement = await ch.statement(today)
        matched_refs = {r.reference for r in statement} - {
            r for _, r in found}
        assert report["fees_posted"] == {"EUR": sum(
            r.fee for r in statement if r.reference in matched_refs)}

    failed = findings(db_url)
    assert failed == [], failed
    check_ledger(db_url).assert_sound()
    by = Counter(v[2] for v in ours.values())
    sync_times = sorted(float(v[3]) for v in ours.values() if v[2] in ("sync", "compensation"))
    print(f"\ndrill: {len(created)} operations ({dict(Counter(created.values()))}), "
          f"{len(refused)} refused with 503 ({dict(Counter(refused))}); all settled "
          f"{settled_after:.1f} s after the workload began; settled by {dict(by)}; "
          f"breaker opened {breaker['breaker_opened']} time(s); faults fired "
          f"{dict(Counter(f['fault'] for f in fired))}")
    if sync_times:
        print(f"stuck operations settled by the compensation job after "
              f"{sync_times[0]:.1f}-{sync_times[-1]:.1f} s "
              f"(median {sync_times[len(sync_times) // 2]:.1f} s)")
    print(f"statement: {report['summary']}, items new {report['items_new']}, already "
          f"listed {report['items_already_listed']}, gave up then done at the channel: "
          f"{len(gave_up_then_done)}")
    assert breaker["breaker_opened"] >= 1


# --------------------------------------------------------------------------- units


async def test_breaker_state_machine_on_a_clock_we_move() -> None:
    """closed -> open after the threshold of consecutive failures (a refusal is an answer
    and resets the count); open refuses without calling; after the open period one trial
    at a time; a failed trial opens it again, a good one closes it."""
    from channel.client import ChannelRejected, ChannelUnavailable
    from region_node.breaker import BreakerOpen, CircuitBreaker

    now = [0.0]
    changes: list[str] = []
    breaker = CircuitBreaker(failure_threshold=2, open_seconds=10.0,
                             clock=lambda: now[0], on_change=changes.append)
    calls = 0

    async def fails() -> None:
        nonlocal calls
        calls += 1
        raise ChannelUnavailable("down")

    async def refuses() -> None:
        nonlocal calls
        calls += 1
        raise ChannelRejected("no", 400)

    async def works() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    for fn, exc in ((fails, ChannelUnavailable), (refuses, ChannelRejected),
                    (fails, ChannelUnavailable)):
        with pytest.raises(exc):
            await breaker.call(fn)
    assert breaker.state == "closed"  # the refusal in between reset the count
    with pytest.raises(ChannelUnavailable):
        await breaker.call(fails)
    assert breaker.state == "open" and breaker.retry_after() == 10.0
    before = calls
    with pytest.raises(BreakerOpen) as refused:
        await breaker.call(works)
    assert calls == before and refused.value.retry_after == 10.0
    now[0] = 10.0
    assert breaker.state == "half_open" and breaker.allows()
    with pytest.raises(ChannelUnavailable):
        await breaker.call(fails)  # the trial failed
    assert breaker.state == "open"
    now[0] = 25.0
    assert await breaker.call(works) == "ok"
    assert breaker.state == "closed"
    assert changes == ["open", "half_open", "open", "half_open", "closed"]
    assert breaker.opened_count == 2


def test_lab_channel_is_recorded_and_its_keys_stay_out_of_cluster_json(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lab's channel: recorded in its channel.json (so `paycluster channel ...` finds
    it), rebuilt from cluster.json's entry with its keys read from its secrets.json; the
    node settings it gives carry the keys, the recorded node env does not."""
    from cluster.channel_cli import STATE_FILE
    from cluster.lab import (
        CHANNEL_SECRET_ENV,
        channel_from_json,
        channel_node_env,
        start_lab_channel,
    )

    server = start_lab_channel(tmp_path)
    try:
        record = json.loads((tmp_path / "channel" / STATE_FILE).read_text())
        assert record["pid"] == server.pid and record["url"] == server.url
        again = channel_from_json(server.to_json())
        assert (again.url, again.api_key, again.callback_secret) == \
            (server.url, server.api_key, server.callback_secret)
        assert "api_key" not in json.dumps(server.to_json())
        env = channel_node_env(again, 8123)
        assert env["PAYCLUSTER_CHANNEL_URL"] == server.url
        assert env["PAYCLUSTER_CHANNEL_CALLBACK_URL"] == \
            "http://127.0.0.1:8123/v1/channel/callbacks"
        assert set(CHANNEL_SECRET_ENV) <= set(env)
        for name, value in env.items():  # as the node process reads them
            monkeypatch.setenv(name, value)
        settings = ChannelLinkSettings()
        assert settings.url == server.url and settings.api_key == server.api_key
        assert settings.compensation_seconds == 5.0
        assert settings.retry_schedule_seconds == [10.0, 30.0, 60.0]
    finally:
        server.stop()
    assert not server.is_running()


async def test_daily_statement_job_settles_a_capture_we_still_waited_for(
        servers: RegionServers, db_url: str, own_channel: ChannelServer) -> None:
    """The statement job (here every second, for today): a pay-in whose callbacks were
    lost and whose compensation is an hour away is settled from the statement, once."""
    async with ChannelAdmin(own_channel.admin_url, own_channel.admin_key) as adm:
        await adm.set_faults(seed=6, callback_drop=1.0)
    settings = node_settings(servers, db_url, own_channel, stuck_after_seconds=3600.0,
                             run_statement_job=True, statement_seconds=1.0,
                             statement_lag_days=0)
    async with http_node(settings) as client:
        acc = await open_account(client, "EUR")
        pin = (await payin(client, acc, 3_300)).json()
        done = await wait_status(client, "payin", pin["id"], ("succeeded",), within=30)
        assert done["settled_by"] == "statement"
        assert await balance(client, acc) == 3_300
    assert postings(db_url, pin["id"]) == [("payin", 3_300)]
    assert findings(db_url) == []
