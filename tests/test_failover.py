"""Planned failover on three real regions: the home region eu-west is handed from eu-west to
us-east and back while clients keep paying from accounts homed there, through every region.

Afterwards: every acknowledged payment exists in every region (RPO 0) exactly once, the
ledger balances and conserves money, no replication conflict was counted anywhere (the
ownership log is insert-only and the handed-over rows are restamped), writes paused for
well under 10 s per handover, and in between writes for eu-west were served by us-east
under the new epoch.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import psycopg
import pytest

from cluster.failover_cli import failover_targets
from cluster.lab import Cluster, start_cluster
from replication.failover import HandoverError, HandoverReport, planned_handover
from tests.helpers import cluster_ledger_checks, cluster_view

pytestmark = [pytest.mark.integration, pytest.mark.multiregion, pytest.mark.chaos]

REGIONS = ("us-east", "eu-west", "ap-southeast")
HOME, TAKEOVER = "eu-west", "us-east"
WAN_SCALE = 0.1
PAYERS = 8
PAYEES_HOME = 4
PAYEES_AWAY = 2  # homed in ap-southeast: cross-region sagas in flight across the handover
OPENING_BALANCE = 1_000_000
CLIENTS = 8
HOLD_TTL = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-region lab for this module, stopped even if a test fails."""
    lab = start_cluster(tmp_path_factory.mktemp("lab"), regions=3, wan_scale=WAN_SCALE,
                        extra_env={"PAYCLUSTER_TRANSFER_POLL_SECONDS": "0.1",
                                   "PAYCLUSTER_HOLD_TTL_SECONDS": str(HOLD_TTL),
                                   "PAYCLUSTER_HOLD_EXPIRY_POLL_SECONDS": "0.2"})
    try:
        yield lab
    finally:
        lab.stop()


@dataclass
class Ack:
    """A payment the client saw acknowledged."""

    payment_id: str
    at: float
    served_by: str
    status: str


@dataclass
class Workload:
    """Payments from accounts homed in HOME, each sent to a random region, retried with
    the same Idempotency-Key on 503 / 409 / transport errors until answered."""

    clients: dict[str, httpx.AsyncClient]
    payers: list[str]
    payees: list[str]
    acks: list[Ack] = field(default_factory=list)
    retries: int = 0
    declined: int = 0
    errors: dict[int, int] = field(default_factory=dict)

    async def run(self, seed: int, stop: asyncio.Event) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            body = {"payer": rng.choice(self.payers), "payee": rng.choice(self.payees),
                    "amount": rng.randint(1, 500), "currency": "USD"}
            key = f"fo-{uuid.uuid4()}"
            while True:
                try:
                    resp = await self.clients[rng.choice(REGIONS)].post(
                        "/v1/payments", json=body, headers={"Idempotency-Key": key})
                except httpx.HTTPError:
                    self.retries += 1
                    await asyncio.sleep(0.05)
                    continue
                if resp.status_code in (503, 409):
                    self.retries += 1
                    self.errors[resp.status_code] = self.errors.get(resp.status_code, 0) + 1
                    await asyncio.sleep(0.05)
                    continue
                break
            if resp.status_code == 402:
                self.declined += 1
                continue
            assert resp.status_code in (200, 201), resp.text
            doc = resp.json()
            self.acks.append(Ack(doc["id"], time.monotonic(),
                                 resp.headers.get("paycluster-served-by", "?"), doc["status"]))


async def _open(clients: dict[str, httpx.AsyncClient], home: str, deposit: int) -> str:
    resp = await clients[home].post("/v1/accounts", json={"currency": "USD", "home_region": home},
                                    headers={"Idempotency-Key": f"open-{uuid.uuid4()}"})
    assert resp.status_code == 201, resp.text
    account = str(resp.json()["id"])
    if deposit:
        dep = await clients[home].post(f"/v1/accounts/{account}/deposits",
                                       json={"amount": deposit},
                                       headers={"Idempotency-Key": f"dep-{uuid.uuid4()}"})
        assert dep.status_code == 201, dep.text
    return account


def _largest_gap(acks: list[Ack], start: float, end: float) -> float:
    """Longest time without any acknowledged payment between `start` and `end`."""
    times = sorted([start, end] + [a.at for a in acks if start <= a.at <= end])
    return max(b - a for a, b in itertools.pairwise(times))


async def _quiesce(cluster: Cluster, expect: int, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while True:
        views = [cluster_view(cluster.region(r).dsn) for r in REGIONS]
        same = all(v["accounts"] == views[0]["accounts"] and v["payments"] == views[0]["payments"]
                   for v in views)
        processing = sum(v["processing"] for v in views)
        if same and processing == 0 and len(views[0]["payments"]) == expect:
            return
        assert time.monotonic() < deadline, (
            f"no quiescence: processing={processing}, identical={same}, "
            f"payments={[len(v['payments']) for v in views]} (expected {expect})")
        await asyncio.sleep(0.5)


async def _owner_everywhere(cluster: Cluster, home: str, owner: str, epoch: int) -> None:
    """Every region's ownership endpoint reports `owner` at `epoch` (replicated)."""
    deadline = time.monotonic() + 10
    async with httpx.AsyncClient(timeout=5, headers=cluster.auth_headers()) as client:
        for name in REGIONS:
            while True:
                doc = (await client.get(f"{cluster.region(name).api_url}/v1/cluster/ownership")
                       ).json()
                row = {r["home_region"]: r for r in doc["ownership"]}.get(home)
                if row and (row["serving_region"], row["epoch"], row["banned"]) == (
                        owner, epoch, False):
                    break
                assert time.monotonic() < deadline, (name, row)
                await asyncio.sleep(0.05)


async def test_planned_handover_and_failback_lose_nothing(cluster: Cluster) -> None:
    api = {name: cluster.region(name).api_url for name in REGIONS}
    clients = {r: httpx.AsyncClient(base_url=u, timeout=30, headers=cluster.auth_headers())
               for r, u in api.items()}
    try:
        payers = [await _open(clients, HOME, OPENING_BALANCE) for _ in range(PAYERS)]
        payees = ([await _open(clients, HOME, 0) for _ in range(PAYEES_HOME)]
                  + [await _open(clients, "ap-southeast", 0) for _ in range(PAYEES_AWAY)])
        deposits = PAYERS * OPENING_BALANCE
        work = Workload(clients, payers, payees)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(work.run(i, stop)) for i in range(CLIENTS)]
        reports: list[HandoverReport] = []
        try:
            await asyncio.sleep(2.0)
            regions, lock_urls = failover_targets(cluster, TAKEOVER)
            t_over = time.monotonic()
            over = await planned_handover(regions, lock_urls, HOME, TAKEOVER,
                                       headers=cluster.auth_headers())
            reports.append(over)
            t_over_done = time.monotonic()
            await _owner_everywhere(cluster, HOME, TAKEOVER, over.new_epoch)
            await asyncio.sleep(3.0)
            regions, lock_urls = failover_targets(cluster, HOME)
            t_back = time.monotonic()
            back = await planned_handover(regions, lock_urls, HOME, HOME,
                                       headers=cluster.auth_headers())
            reports.append(back)
            t_back_done = time.monotonic()
            await _owner_everywhere(cluster, HOME, HOME, back.new_epoch)
            await asyncio.sleep(2.0)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        for client in clients.values():
            await client.aclose()

    # The handovers themselves.
    assert [(r.from_region, r.to_region, r.aborted) for r in reports] == [
        (HOME, TAKEOVER, False), (TAKEOVER, HOME, False)]
    # Epochs are lease tokens: eu-west took one at its start (above the bootstrap's 1).
    # Between the handovers us-east may have taken its lease again (a renewal that missed
    # its margin on a busy machine gets a new token): epochs only go up.
    assert 1 < over.old_epoch < over.new_epoch <= back.old_epoch < back.new_epoch
    for report in reports:
        assert report.unavailable_seconds is not None and report.unavailable_seconds < 10.0, report
    # What clients felt: the longest stretch without a single acknowledged payment.
    gap_over = _largest_gap(work.acks, t_over, t_over_done + 1.0)
    gap_back = _largest_gap(work.acks, t_back, t_back_done + 1.0)
    assert gap_over < 10.0 and gap_back < 10.0, (gap_over, gap_back)

    # In between, us-east served eu-west's payments, under the new epoch.
    between = [a for a in work.acks if t_over_done + 0.6 < a.at < t_back]
    assert between and {a.served_by for a in between} == {TAKEOVER}, \
        {a.served_by for a in between}
    after = [a for a in work.acks if a.at > t_back_done + 0.6]
    assert after and {a.served_by for a in after} == {HOME}

    # RPO 0, no duplicates, everywhere; the ledger sound; zero conflicts.
    acked = [a.payment_id for a in work.acks]
    assert len(acked) == len(set(acked))
    await _quiesce(cluster, len(acked))
    for region in REGIONS:
        dsn = cluster.region(region).dsn
        cluster_ledger_checks(dsn, deposits)
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("select id::text, epoch from payments where home_region = %s",
                                (HOME,)).fetchall()
            epochs: dict[str, int] = {str(r[0]): int(r[1]) for r in rows}
            log = conn.execute("select epoch, serving_region from ownership_epochs "
                               "where home_region = %s order by epoch", (HOME,)).fetchall()
        assert len(rows) == len(epochs) == len(acked), region
        assert set(epochs) == set(acked), region
        assert log[0] == (1, HOME) and (over.old_epoch, HOME) in log, log
        assert (over.new_epoch, TAKEOVER) in log and (back.new_epoch, HOME) in log, log
        # After the failback eu-west serves its home; it may have taken its lease again
        # since (a renewal that missed its margin on a busy machine): a later epoch, its own.
        home_epochs = {e for e, serving in log if e >= back.new_epoch}
        assert all(serving == HOME for e, serving in log if e >= back.new_epoch), log
        # Every epoch from the handover to the failback is us-east's, and so is every
        # payment acknowledged in between.
        takeover_epochs = {e for e, serving in log if over.new_epoch <= e <= back.old_epoch}
        assert all(serving == TAKEOVER for e, serving in log
                   if over.new_epoch <= e <= back.old_epoch), log
        assert {epochs[a.payment_id] for a in between} <= takeover_epochs
        assert {epochs[a.payment_id] for a in after} <= home_epochs
    assert over.unavailable_seconds is not None and back.unavailable_seconds is not None
    print(f"\n{len(acked)} payments acknowledged ({work.declined} declined, {work.retries} "
          f"retries: {work.errors}); handover {over.unavailable_seconds * 1000:.0f} ms "
          f"(clients' longest gap {gap_over * 1000:.0f} ms), failback "
          f"{back.unavailable_seconds * 1000:.0f} ms (gap {gap_back * 1000:.0f} ms); "
          f"steps: {[(s.name, round(s.seconds * 1000)) for s in over.steps]}")



async def test_handover_aborts_when_a_region_cannot_catch_up(cluster: Cluster) -> None:
    """With ap-southeast cut off from eu-west, the ban never reaches it: the handover
    aborts after the catch-up bound and eu-west serves its accounts again, under a new
    epoch without a ban; nothing was written for eu-west by anyone else."""
    assert cluster.wan is not None
    clients = {r: httpx.AsyncClient(base_url=cluster.region(r).api_url, timeout=30,
                                    headers=cluster.auth_headers())
               for r in REGIONS}
    try:
        payer = await _open(clients, HOME, 10_000)
        payee = await _open(clients, HOME, 0)
        regions, lock_urls = failover_targets(cluster, TAKEOVER)
        with cluster.wan.control() as wan:
            wan.cut(HOME, "ap-southeast")
            try:
                with pytest.raises(HandoverError, match="catch-up timed out") as failed:
                    await planned_handover(regions, lock_urls, HOME, TAKEOVER,
                                           catch_up_timeout=1.5,
                                           headers=cluster.auth_headers())
            finally:
                wan.heal(HOME, "ap-southeast")
        report = failed.value.report
        assert report is not None and report.aborted
        assert [s.name for s in report.steps][-2:] == ["abort", "handed back"]
        await _owner_everywhere(cluster, HOME, HOME, report.new_epoch)
        resp = await clients[TAKEOVER].post(
            "/v1/payments", json={"payer": payer, "payee": payee, "amount": 100,
                                  "currency": "USD"},
            headers={"Idempotency-Key": f"after-abort-{uuid.uuid4()}"})
        assert resp.status_code == 201, resp.text
        assert resp.headers["paycluster-served-by"] == HOME
    finally:
        for c in clients.values():
            await c.aclose()
    with psycopg.connect(cluster.region(HOME).dsn) as conn:
        epoch = conn.execute("select epoch from payments where id = %s",
                             (resp.json()["id"],)).fetchone()
    assert epoch == (report.new_epoch,)


async def test_only_the_owner_releases_expired_holds(cluster: Cluster) -> None:
    """A hold of eu-west's, while us-east serves eu-west, expires: us-east releases it
    once (the other regions' expiry workers leave it alone), with zero conflicts."""
    clients = {r: httpx.AsyncClient(base_url=cluster.region(r).api_url, timeout=30,
                                    headers=cluster.auth_headers())
               for r in REGIONS}
    try:
        payer = await _open(clients, HOME, 10_000)
        payee = await _open(clients, HOME, 0)
        regions, lock_urls = failover_targets(cluster, TAKEOVER)
        over = await planned_handover(regions, lock_urls, HOME, TAKEOVER,
                                      headers=cluster.auth_headers())
        await _owner_everywhere(cluster, HOME, TAKEOVER, over.new_epoch)
        resp = await clients[HOME].post(
            "/v1/payments", json={"payer": payer, "payee": payee, "amount": 700,
                                  "currency": "USD", "capture_method": "manual"},
            headers={"Idempotency-Key": f"hold-{uuid.uuid4()}"})
        assert resp.status_code == 201, resp.text
        assert resp.headers["paycluster-served-by"] == TAKEOVER
        payment = resp.json()["id"]
        deadline = time.monotonic() + 4 * HOLD_TTL + 10
        while True:
            states = []
            for name in REGIONS:
                with psycopg.connect(cluster.region(name).dsn) as conn:
                    row = conn.execute("select status from payments where id = %s",
                                       (payment,)).fetchone()
                states.append(row[0] if row else None)
            if states == ["canceled"] * len(REGIONS):
                break
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.2)
        regions, lock_urls = failover_targets(cluster, HOME)
        await planned_handover(regions, lock_urls, HOME, HOME,
                               headers=cluster.auth_headers())
    finally:
        for c in clients.values():
            await c.aclose()
    await asyncio.sleep(1.0)
    for name in REGIONS:
        with psycopg.connect(cluster.region(name).dsn) as conn:
            barrier = conn.execute("select op, count(*) from tcc_barrier where gid = %s "
                                   "group by op order by op", (payment,)).fetchall()
            conflicts = conn.execute(
                "select subname, confl_insert_exists + confl_update_origin_differs "
                "+ confl_update_exists + confl_update_missing + confl_delete_origin_differs "
                "+ confl_delete_missing + confl_multiple_unique_conflicts, apply_error_count "
                "from pg_stat_subscription_stats").fetchall()
            balance = conn.execute("select balance, held from accounts where id = %s",
                                   (payer,)).fetchone()
        # Conflicts only: the WAN cut of the test before counted apply errors (lost stream).
        assert all(c == 0 for _, c, _ in conflicts), (name, conflicts)
        assert [op for op, n in barrier if n == 1] == [op for op, _ in barrier], barrier
        assert "cancel" in [op for op, _ in barrier], barrier
        assert balance == (10_000, 0), (name, balance)
