"""Settling reconciliation items (region_node/reconciliation.py, POST
/v1/admin/reconciliation/resolve), on a real node and store.

The situation is the one of tests/test_suspense.py: this region (us-east) credited a payee
from its clearing account for a transfer whose payment and debit were lost with eu-west,
the reconciliation listing names that credit (an orphan credit), and us-east parked it
in its suspense account. The operator then claws it back from the payee, writes it off,
or acknowledges it; a lost payment can only be acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncConnection
from typer.testing import CliRunner

from cluster.cli import app as cli
from cluster.failover_cli import failover_targets
from cluster.invariants import ledger_findings
from cluster.lab import start_cluster
from region_node import reconciliation, suspense, transfers
from region_node.config import RegionSettings
from region_node.db import Database
from region_node.errors import Conflict
from region_node.ids import new_id
from region_node.regions import RegionCatalog
from replication.failover import planned_handover
from tests.conftest import app_client, auth_headers
from tests.helpers import check_ledger, open_account, wait_for

pytestmark = pytest.mark.integration

AMOUNT = 4_321
EPOCH = 7
RESOLVE = "/v1/admin/reconciliation/resolve"
CONCURRENT = 20


async def orphan_credit(db_url: str, payee: str, *, park: bool = True,
                        region: str = "us-east", lost: str = "eu-west") -> str:
    """Credit `payee` (homed in `region`) for a transfer from `lost` whose payment this
    store never has, list it as an orphan credit item (as `replication.reconcile.lost_tail`
    does, under home `lost`) and, with `park`, wait until it is parked in suspense (or park
    it); returns the item id (the credit's journal id)."""
    catalog = RegionCatalog()

    def lost_id() -> uuid.UUID:
        return catalog.stamp(new_id(), lost)

    message = transfers.TransferMessage(
        id=lost_id(), payment_id=lost_id(), payer_id=lost_id(), payee_id=uuid.UUID(payee),
        from_home=lost, to_home=region, amount=AMOUNT, currency="USD")
    db = Database(db_url)
    try:
        async def credit(conn: AsyncConnection) -> transfers.TransferOutcome:
            return await transfers.receive(conn, region=region, message=message)

        assert (await db.transaction(credit)).outcome == "credited"
        with psycopg.connect(db_url, autocommit=True) as conn:
            row = conn.execute(
                "select r.journal_id, e.account_id from transfer_results r join "
                "journal_entries e on e.journal_id = r.journal_id and e.amount < 0 "
                "where r.transfer_id = %s", (message.id,)).fetchone()
            assert row is not None
            journal_id, clearing = row
            detail = {"payment_id": str(message.payment_id), "transfer_id": str(message.id),
                      "payee": payee, "to_home": region, "journal_id": str(journal_id),
                      "clearing_account": str(clearing), "credit_region": region,
                      "amount": AMOUNT, "currency": "USD"}
            _insert_item(conn, journal_id, suspense.ITEM_KIND, detail, home=lost,
                         listed_by=region)
        if park:
            async def park_it(conn: AsyncConnection) -> None:
                for found in await suspense.pending(conn, region=region, limit=10):
                    await suspense.park(conn, region=region, credit=found)

            await db.transaction(park_it)  # a no-op if the node's worker was first
            assert _parked(db_url, message.payment_id)
    finally:
        await db.engine.dispose()
    return str(journal_id)


def _insert_item(conn: psycopg.Connection[Any], item_id: uuid.UUID, kind: str,
                 detail: dict[str, Any], home: str = "eu-west",
                 listed_by: str = "us-east") -> None:
    conn.execute(
        "insert into reconciliation_items (home_region, takeover_epoch, item_id, item_kind, "
        "lost_region, listed_by, status, currency, amount, detail) values (%s, %s, %s, %s, "
        "%s, %s, 'credited', 'USD', %s, %s::jsonb)",
        (home, EPOCH, item_id, kind, home, listed_by, AMOUNT, json.dumps(detail)))


def _parked(db_url: str, payment_id: uuid.UUID) -> bool:
    with psycopg.connect(db_url) as conn:
        return conn.execute("select 1 from journal_entries where payment_id = %s and "
                            "entry_type = 'suspense'", (payment_id,)).fetchone() is not None


def by_kind(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        return {str(k): int(v) for k, v in conn.execute(
            "select kind, sum(balance)::bigint from accounts group by kind")}


def rows(db_url: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(sql, params).fetchall()


def request(item_id: str, resolution: str, note: str = "told the payee") -> dict[str, Any]:
    return {"home_region": "eu-west", "takeover_epoch": EPOCH, "item_id": item_id,
            "resolution": resolution, "note": note}


def assert_sound(db_url: str) -> None:
    check_ledger(db_url).assert_sound()
    failed = [f for f in ledger_findings("us-east", db_url) if not f.ok]
    assert failed == [], failed


async def listed(client: httpx.AsyncClient) -> dict[str, Any]:
    resp = await client.get("/v1/admin/reconciliation")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def test_claw_back_takes_the_credit_back(client: httpx.AsyncClient, db_url: str) -> None:
    payee = await open_account(client, kind="merchant")
    item = await orphan_credit(db_url, payee)
    assert by_kind(db_url)["suspense"] == -AMOUNT and by_kind(db_url)["merchant"] == AMOUNT
    before = await listed(client)
    assert before["summary"]["open_by_kind_and_currency"] == [
        {"item_kind": "orphan_credit", "currency": "USD", "count": 1, "amount": AMOUNT}]
    assert before["items"][0]["resolution"] is None
    assert before["items"][0]["resolver_region"] == "us-east"

    resp = await client.post(RESOLVE, json=request(item, "claw_back"))
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["resolution"] == "claw_back" and body["amount"] == AMOUNT
    assert body["region"] == "us-east" and body["journal_id"]

    kinds = by_kind(db_url)
    assert kinds["merchant"] == 0 and kinds["suspense"] == 0 and kinds["clearing"] == 0
    legs = rows(db_url, "select account_id::text, amount from journal_entries "
                        "where journal_id = %s", body["journal_id"])
    assert sorted(a for _, a in legs) == [-AMOUNT, AMOUNT]
    assert (payee, -AMOUNT) in legs
    assert_sound(db_url)
    after = await listed(client)
    assert after["summary"]["open"] == 0
    assert after["summary"]["resolved_by_resolution"] == {"claw_back": 1}
    assert after["items"][0]["resolution"]["note"] == "told the payee"
    # Audited in the effect's transaction, with the resolving admin.
    audit = rows(db_url, "select status, principal_id from audit_log "
                         "where action = 'reconciliation.resolve'")
    assert [a[0] for a in audit] == [201] and audit[0][1] is not None
    assert str(audit[0][1]) == body["resolved_by"]


async def test_write_off_the_house_absorbs_it(client: httpx.AsyncClient, db_url: str) -> None:
    payee = await open_account(client, kind="merchant")
    item = await orphan_credit(db_url, payee)
    funding_before = by_kind(db_url).get("funding", 0)
    resp = await client.post(RESOLVE, json=request(item, "write_off", "house absorbs it"))
    assert resp.status_code == 201, resp.text
    kinds = by_kind(db_url)
    assert kinds["suspense"] == 0 and kinds["merchant"] == AMOUNT, "the payee keeps it"
    assert kinds["funding"] == funding_before - AMOUNT, "paid for by the house"
    assert rows(db_url, "select count(*) from journal_entries where entry_type = "
                        "'write_off'") == [(2,)]
    assert_sound(db_url)


async def test_claw_back_needs_the_payees_funds(client: httpx.AsyncClient,
                                                db_url: str) -> None:
    payee = await open_account(client, kind="merchant")
    item = await orphan_credit(db_url, payee)
    spent = await client.post(f"/v1/accounts/{payee}/withdrawals", json={"amount": 1_000})
    assert spent.status_code == 201, spent.text
    before = by_kind(db_url)
    entries = rows(db_url, "select count(*) from journal_entries")
    resp = await client.post(RESOLVE, json=request(item, "claw_back"))
    assert resp.status_code == 402, resp.text
    assert resp.json()["error"]["code"] == "insufficient_funds"
    assert by_kind(db_url) == before
    assert rows(db_url, "select count(*) from journal_entries") == entries
    assert rows(db_url, "select count(*) from reconciliation_resolutions") == [(0,)]
    # Still open: it can be written off instead.
    assert (await client.post(RESOLVE, json=request(item, "write_off"))).status_code == 201
    assert_sound(db_url)


async def test_acknowledge_a_lost_payment_once(client: httpx.AsyncClient, db_url: str) -> None:
    payment = str(new_id())
    with psycopg.connect(db_url, autocommit=True) as conn:
        _insert_item(conn, uuid.UUID(payment), "payment", {"id": payment}, home="us-east")
    req = {**request(payment, "acknowledge", "customer told it did not happen"),
           "home_region": "us-east"}
    money = by_kind(db_url)
    wrong = await client.post(RESOLVE, json={**req, "resolution": "claw_back"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == \
        "resolution_not_allowed", wrong.text
    blank = await client.post(RESOLVE, json={**req, "note": "   "})
    assert blank.status_code == 400 and blank.json()["error"]["param"] == "note", blank.text
    headers = {"Idempotency-Key": "ack-1"}
    first = await client.post(RESOLVE, json=req, headers=headers)
    assert first.status_code == 201, first.text
    assert first.json()["journal_id"] is None and first.json()["amount"] is None
    replay = await client.post(RESOLVE, json=req, headers=headers)
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == first.json()
    again = await client.post(RESOLVE, json=req)
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_resolved"
    assert "acknowledge at us-east" in again.json()["error"]["message"]
    assert by_kind(db_url) == money, "no money moves"
    missing = await client.post(RESOLVE, json={**req, "item_id": str(new_id())})
    assert missing.status_code == 404, missing.text


async def test_not_parked_yet_is_409(settings: RegionSettings, db_url: str) -> None:
    # No workers: nothing parks the credit behind the test's back.
    async with app_client(settings.model_copy(update={"run_workers": False})) as client:
        payee = await open_account(client, kind="merchant")
        deposit = await client.post(f"/v1/accounts/{payee}/deposits",
                                    json={"amount": AMOUNT})
        assert deposit.status_code == 201
        item = await orphan_credit(db_url, payee, park=False)
        for resolution in ("claw_back", "write_off"):
            resp = await client.post(RESOLVE, json=request(item, resolution))
            assert resp.status_code == 409, resp.text
            assert resp.json()["error"]["code"] == "not_parked"
        assert rows(db_url, "select count(*) from reconciliation_resolutions") == [(0,)]
        # Acknowledging moves no money, so it needs no parking.
        ack = await client.post(RESOLVE, json=request(item, "acknowledge"))
        assert ack.status_code == 201, ack.text


async def test_only_admins_resolve(client: httpx.AsyncClient, db_url: str) -> None:
    payee = await open_account(client, kind="merchant")
    item = await orphan_credit(db_url, payee)
    made = await client.post("/v1/admin/principals", json={"name": "cust", "role": "customer"},
                             headers=auth_headers())
    assert made.status_code == 201, made.text
    key = made.json()["api_key"]["key"]
    for method, path, body in (("POST", RESOLVE, request(item, "write_off")),
                               ("GET", "/v1/admin/reconciliation", None)):
        resp = await client.request(method, path, json=body,
                                    headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 403, resp.text
    assert rows(db_url, "select count(*) from reconciliation_resolutions") == [(0,)]


async def test_only_the_payees_owner_resolves_an_orphan_credit(
        client: httpx.AsyncClient, db_url: str) -> None:
    """The domain refuses a region that may not insert the resolution's key."""
    payee = await open_account(client, kind="merchant")
    item_id = await orphan_credit(db_url, payee)
    db = Database(db_url)
    try:
        async def step(conn: AsyncConnection) -> dict[str, Any]:
            item = await reconciliation.get_item(conn, "eu-west", EPOCH, uuid.UUID(item_id))
            return await reconciliation.resolve(
                conn, region="ap-southeast", item=item, resolution="write_off", note="x",
                resolved_by=None, journal_id=new_id())

        with pytest.raises(Conflict) as refused:
            await db.transaction(step)
    finally:
        await db.engine.dispose()
    assert refused.value.code == "wrong_region" and "us-east" in refused.value.message


async def test_concurrent_resolves_settle_once(client: httpx.AsyncClient, db_url: str) -> None:
    payee = await open_account(client, kind="merchant")
    item = await orphan_credit(db_url, payee)
    answers = await asyncio.gather(*(
        client.post(RESOLVE, json=request(item, "claw_back" if i % 2 else "write_off"))
        for i in range(CONCURRENT)))
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {201: 1, 409: CONCURRENT - 1}, [a.text for a in answers]
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 409} == \
        {"already_resolved"}
    winner = next(a.json() for a in answers if a.status_code == 201)
    postings = rows(db_url, "select journal_id::text, count(*) from journal_entries where "
                            "entry_type in ('claw_back', 'write_off') group by journal_id")
    assert postings == [(winner["journal_id"], 2)], "exactly one posting"
    assert by_kind(db_url)["suspense"] == 0
    assert_sound(db_url)


def count_of(dsn: str, table: str, count: int) -> Callable[[], bool]:
    """A check: `table` in the store at `dsn` holds `count` rows."""
    return lambda: rows(dsn, f"select count(*) from {table}") == [(count,)]


@pytest.mark.lab
@pytest.mark.multiregion
@pytest.mark.timeout(120)
async def test_cli_and_forwarding_on_a_two_region_lab(tmp_path: Path) -> None:
    """`paycluster reconcile` against a real lab: it settles an orphan credit of eu-west
    at eu-west; a resolve of a us-east item sent to eu-west is forwarded to us-east; the
    resolutions replicate both ways with zero conflicts and sound ledgers."""
    # start_cluster and stop run their own event loops: off this one.
    cluster = await asyncio.to_thread(start_cluster, tmp_path / "lab", regions=2,
                                      wan_scale=0.0)
    try:
        us, eu = cluster.region("us-east"), cluster.region("eu-west")
        headers = cluster.auth_headers()
        async with httpx.AsyncClient(headers=headers, timeout=10) as http:
            opened = await http.post(f"{eu.api_url}/v1/accounts", json={
                "currency": "USD", "kind": "merchant", "home_region": "eu-west"})
        assert opened.status_code == 201, opened.text
        # A credit at eu-west for a payment lost with us-east; eu-west's node parks it.
        orphan = await orphan_credit(eu.dsn, opened.json()["id"], region="eu-west",
                                     lost="us-east")
        payment = new_id()
        with psycopg.connect(us.dsn, autocommit=True) as conn:
            _insert_item(conn, payment, "payment", {"id": str(payment)}, home="us-east",
                         listed_by="us-east")
        for region in (us, eu):
            wait_for(count_of(region.dsn, "reconciliation_items", 2), 20,
                     f"both items in {region.name}")

        runner = CliRunner()
        data_dir = str(cluster.data_dir)
        listed = runner.invoke(cli, ["reconcile", "list", "-d", data_dir, "--json"])
        assert listed.exit_code == 0, listed.output
        resolvers = {i["item_id"]: i["resolver_region"]
                     for i in json.loads(listed.output)["items"]}
        assert resolvers == {orphan: "eu-west", str(payment): "us-east"}
        args = ["reconcile", "resolve", "-d", data_dir, "--home", "us-east", "--epoch",
                str(EPOCH), "--item", orphan, "--resolution", "claw_back", "--note", "agreed"]
        done = runner.invoke(cli, [*args, "--json"])
        assert done.exit_code == 0, done.output
        assert json.loads(done.output)["region"] == "eu-west"
        again = runner.invoke(cli, args)
        assert again.exit_code == 1 and "already_resolved" in again.output, again.output

        async with httpx.AsyncClient(headers=headers, timeout=10) as http:
            forwarded = await http.post(f"{eu.api_url}{RESOLVE}", json={
                **request(str(payment), "acknowledge"), "home_region": "us-east"})
        assert forwarded.status_code == 201, forwarded.text
        assert forwarded.headers["paycluster-served-by"] == "us-east"
        assert forwarded.json()["region"] == "us-east"

        for region in (us, eu):
            wait_for(count_of(region.dsn, "reconciliation_resolutions", 2), 20,
                     f"both resolutions in {region.name}")
            assert by_kind(region.dsn)["suspense"] == 0
            failed = [f for f in ledger_findings(region.name, region.dsn) if not f.ok]
            assert failed == [], failed
    finally:
        await asyncio.to_thread(cluster.stop)


async def _resolve_until_decided(http: httpx.AsyncClient, url: str, body: dict[str, Any],
                                 headers: dict[str, str] | None = None) -> httpx.Response:
    """POST a resolve, asked again (same key) while the answer is no decision: a 503 while
    a node's ownership view still names the old owner right after a handover."""
    deadline = time.monotonic() + 60
    while True:
        resp = await http.post(url, json=body, headers=headers)
        if resp.status_code != 503:
            return resp
        assert time.monotonic() < deadline, resp.text
        await asyncio.sleep(0.2)


@pytest.mark.lab
@pytest.mark.multiregion
@pytest.mark.timeout(240)
async def test_claw_back_wherever_the_payees_home_is_served(tmp_path: Path) -> None:
    """eu-west credited its merchant for a payment lost with us-east and parked the credit
    in eu-west's suspense account; then the merchant's home (eu-west) is handed over to
    us-east. A claw-back sent to eu-west, which no longer owns the payee, is forwarded to
    us-east and settled there, once: the merchant is debited, us-east's suspense account
    takes the amount (eu-west's keeps the parked debit: per region like clearing, summing
    to zero), a retry with the same key through us-east replays, another is 409."""
    cluster = await asyncio.to_thread(start_cluster, tmp_path / "lab", regions=2,
                                      wan_scale=0.0)
    try:
        us, eu = cluster.region("us-east"), cluster.region("eu-west")
        headers = cluster.auth_headers()
        async with httpx.AsyncClient(headers=headers, timeout=30) as http:
            opened = await http.post(f"{eu.api_url}/v1/accounts", json={
                "currency": "USD", "kind": "merchant", "home_region": "eu-west"})
            assert opened.status_code == 201, opened.text
            payee = opened.json()["id"]
            orphan = await orphan_credit(eu.dsn, payee, region="eu-west", lost="us-east")
            # The parking posting reaches us-east before it may settle the item.
            wait_for(count_of(us.dsn, "reconciliation_items", 1), 30, "item in us-east")
            wait_for(lambda: rows(us.dsn, "select count(*) from journal_entries "
                                          "where entry_type = 'suspense'") == [(2,)],
                     30, "the parking posting in us-east")

            regions, lock_urls = failover_targets(cluster, "us-east")
            over = await planned_handover(regions, lock_urls, "eu-west", "us-east",
                                          headers=headers)
            assert not over.aborted, over

            item = {**request(orphan, "claw_back", "payee agreed"), "home_region": "us-east"}
            key = {"Idempotency-Key": f"claw-{orphan}"}
            done = await _resolve_until_decided(http, f"{eu.api_url}{RESOLVE}", item, key)
            assert done.status_code == 201, done.text
            assert done.headers["paycluster-served-by"] == "us-east"
            assert done.json()["region"] == "us-east"
            assert done.json()["resolution"] == "claw_back"
            assert done.json()["amount"] == AMOUNT
            replay = await _resolve_until_decided(http, f"{us.api_url}{RESOLVE}", item, key)
            assert replay.status_code == 201, replay.text
            assert replay.headers["idempotent-replayed"] == "true"
            assert replay.json() == done.json()
            again = await _resolve_until_decided(http, f"{eu.api_url}{RESOLVE}", item)
            assert again.status_code == 409, again.text
            assert again.json()["error"]["code"] == "already_resolved"
            listing = (await http.get(f"{eu.api_url}/v1/admin/reconciliation")).json()
            assert [(i["item_id"], i["resolver_region"], i["resolution"]["region"])
                    for i in listing["items"]] == [(orphan, "us-east", "us-east")]

        for region in (us, eu):
            wait_for(count_of(region.dsn, "reconciliation_resolutions", 1), 30,
                     f"the resolution in {region.name}")
            wait_for(lambda dsn=region.dsn: rows(
                dsn, "select count(*) from journal_entries where entry_type = 'claw_back'"
            ) == [(2,)], 30, f"the claw-back posting in {region.name}")
            assert rows(region.dsn, "select balance from accounts where id = %s",
                        payee) == [(0,)], "credited once, clawed back once"
            assert dict(rows(region.dsn, "select home_region, balance from accounts "
                                         "where kind = 'suspense'")) == {
                "eu-west": -AMOUNT, "us-east": AMOUNT}
            assert by_kind(region.dsn)["suspense"] == 0
            failed = [f for f in ledger_findings(region.name, region.dsn) if not f.ok]
            assert failed == [], failed
    finally:
        await asyncio.to_thread(cluster.stop)
