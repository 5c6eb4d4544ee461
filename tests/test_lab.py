"""The local lab as an operator uses it: three regions behind the WAN emulator, cluster.json
as the handle, links cut and healed on a live cluster, a region added to a running lab, and
nothing left running after a stop.

Real servers throughout (PostgreSQL 18, Redis, NATS, region nodes, the emulator process).
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.invariants import conflict_counts
from cluster.lab import (
    REGION_NAMES,
    WAN_SERVICES,
    Cluster,
    add_region,
    is_ours,
    read_cluster,
    start_cluster,
    stop_cluster,
)
from cluster.wan import WanControl, default_rtt_seconds
from tests.helpers import cluster_ledger_checks, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.multiregion, pytest.mark.timeout(120)]

WAN_SCALE = 0.2
WAIT = 30.0
"""Bound on every wait for a condition; a healthy run needs a small fraction of it."""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-region lab with a fifth of the default WAN delays; stopped even on failure."""
    cluster = start_cluster(tmp_path_factory.mktemp("lab"), regions=3, wan_scale=WAN_SCALE,
                            extra_env={"PAYCLUSTER_REPLICATION_SLO_SECONDS": "20"})
    try:
        yield cluster
    finally:
        cluster.stop()


def account_in_db(dsn: str, account_id: str) -> bool:
    """True once the account row has reached this region's own database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("select 1 from accounts where id = %s",
                            (account_id,)).fetchone() is not None


def open_account(api_url: str, home: str, auth: dict[str, str]) -> str:
    """Open an account homed in `home` through the region at `api_url` (with the `auth`
    headers: the lab's admin key); its id."""
    resp = httpx.post(f"{api_url}/v1/accounts", json={"currency": "USD", "home_region": home},
                      headers={"Idempotency-Key": f"lab-{uuid.uuid4()}", **auth}, timeout=10)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def processes_under(path: Path) -> list[psutil.Process]:
    """Live processes whose command line or working directory is inside `path`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        if str(path) in text:
            found.append(proc)
    return found


def test_three_regions_are_ready_and_cluster_json_lists_every_link(lab: Cluster) -> None:
    doc = read_cluster(lab.data_dir)
    # The bootstrap admin key is in cluster.json, which only its owner may read.
    assert stat.S_IMODE(os.stat(lab.cluster_file).st_mode) == 0o600
    assert doc["admin_key"] == lab.admin_key and lab.admin_key.startswith("pck_")
    for name in REGION_NAMES:
        who = httpx.get(f"{lab.region(name).api_url}/v1/admin/audit", timeout=5,
                        headers=lab.auth_headers())
        assert who.status_code == 200, (name, who.text)
        assert httpx.get(f"{lab.region(name).api_url}/v1/admin/audit",
                         timeout=5).status_code == 401
    assert doc["status"] == "running"
    assert list(doc["regions"]) == list(REGION_NAMES)
    for name, region in doc["regions"].items():
        ready = httpx.get(f"{region['api_url']}/health/ready", timeout=5)
        assert ready.status_code == 200 and ready.json()["region"] == name
        for kind in ("node", "postgres", "redis", "nats"):
            assert is_ours(region[kind]), f"{name} {kind} is not running"
        assert region["grpc_port"] and region["postgres_dsn"].endswith("/paycluster")
    assert is_ours(doc["wan"]) and doc["wan"]["control_url"].startswith("http://127.0.0.1:")
    assert is_ours(doc["pg_tls"])

    links = doc["links"]
    pairs = [(a, b) for a in REGION_NAMES for b in REGION_NAMES if a != b]
    assert sorted((lk["src"], lk["dst"], lk["service"]) for lk in links) == sorted(
        (a, b, s) for a, b in pairs for s in WAN_SERVICES)
    assert len({lk["listen_port"] for lk in links}) == len(links) == 18
    regions = doc["regions"]
    for link in links:
        dst = regions[link["dst"]]
        # PostgreSQL is reached across the WAN through the region's TLS gateway only.
        want = {"postgres": dst["pg_gateway_port"], "grpc": dst["grpc_port"],
                "redis": dst["redis"]["port"]}[link["service"]]
        assert link["target"] == f"127.0.0.1:{want}"
        assert link["rtt_ms"] == pytest.approx(
            default_rtt_seconds(link["src"], link["dst"], WAN_SCALE) * 1000)
    # Every node reaches every peer through its own WAN link, never the peer's port.
    for name, region in regions.items():
        assert region["peers"] == {
            lk["dst"]: f"127.0.0.1:{lk['listen_port']}" for lk in links
            if lk["src"] == name and lk["service"] == "grpc"}
    # The live emulator agrees with the file.
    with WanControl(doc["wan"]["control_url"]) as wan:
        live = {(lk["src"], lk["dst"], lk["service"]): lk["listen_port"] for lk in wan.links()}
    assert live == {(lk["src"], lk["dst"], lk["service"]): lk["listen_port"] for lk in links}


def test_replication_runs_through_the_postgres_links(lab: Cluster) -> None:
    with WanControl(read_cluster(lab.data_dir)["wan"]["control_url"]) as wan:
        def down_bytes() -> int:
            # ap-southeast's subscription to eu-west: client in ap-southeast, server in eu-west.
            return next(lk["bytes_down"] for lk in wan.links()
                        if (lk["src"], lk["dst"], lk["service"])
                        == ("ap-southeast", "eu-west", "postgres"))

        before = down_bytes()
        account = open_account(lab.region("us-east").api_url, "eu-west",
                               lab.auth_headers())  # forwarded
        wait_for(lambda: account_in_db(lab.region("ap-southeast").dsn, account), 10,
                 "the eu-west account to replicate to ap-southeast")
        assert down_bytes() > before
    for name in REGION_NAMES:
        status = httpx.get(f"{lab.region(name).api_url}/v1/replication/status", timeout=5,
                           headers=lab.auth_headers()).json()
        assert {p["from"] for p in status["pairs"].values()} == set(REGION_NAMES) - {name}
        assert all(p["apply_running"] for p in status["pairs"].values()), status


def test_cut_link_holds_replication_until_heal(lab: Cluster) -> None:
    eu, ap, us = (lab.region(n) for n in ("eu-west", "ap-southeast", "us-east"))
    with WanControl(read_cluster(lab.data_dir)["wan"]["control_url"]) as wan:
        cut = wan.cut("eu-west", "ap-southeast", mode="blackhole")
        assert {(lk["src"], lk["dst"]) for lk in cut} == {("eu-west", "ap-southeast"),
                                                          ("ap-southeast", "eu-west")}
        assert all(lk["cut"] == "blackhole" for lk in cut) and len(cut) == 2 * len(WAN_SERVICES)
        try:
            account = open_account(eu.api_url, "eu-west", lab.auth_headers())
            wait_for(lambda: account_in_db(us.dsn, account), 10,
                     "the account to reach us-east over its healthy link")
            time.sleep(1.0)
            assert not account_in_db(ap.dsn, account), "replicated through a cut link"
        finally:
            healed = wan.heal("eu-west", "ap-southeast")
        assert all(lk["cut"] is None for lk in healed)
        wait_for(lambda: account_in_db(ap.dsn, account), 10,
                 "the held change to arrive after heal")


def test_cli_status_and_link_commands(lab: Cluster) -> None:
    runner = CliRunner()
    data = ["--data-dir", str(lab.data_dir)]
    status = runner.invoke(app, ["status", "--json", *data])
    assert status.exit_code == 0, status.output
    report = json.loads(status.output)
    assert report["healthy"] and report["slo_seconds"] == 20
    assert {(p["from"], p["to"]) for p in report["pairs"]} == {
        (a, b) for a in REGION_NAMES for b in REGION_NAMES if a != b}
    # Each region serves its own home under the token of its ownership lease (> 1, the
    # bootstrap epoch: region_node.leases).
    assert {row["home_region"] for row in report["ownership"]} == set(REGION_NAMES)
    assert all(row["epoch"] > 1 for row in report["ownership"]), report["ownership"]

    changed = runner.invoke(app, ["link", "set", "us-east", "eu-west", "--rtt-ms", "40",
                                  "--jitter-ms", "4", "--one-way", *data])
    assert changed.exit_code == 0, changed.output
    with WanControl(read_cluster(lab.data_dir)["wan"]["control_url"]) as wan:
        by_pair = {(lk["src"], lk["dst"], lk["service"]): lk for lk in wan.links()}
        assert by_pair[("us-east", "eu-west", "grpc")]["rtt_ms"] == 40
        assert by_pair[("us-east", "eu-west", "grpc")]["jitter_ms"] == 4
        assert by_pair[("eu-west", "us-east", "grpc")]["rtt_ms"] == pytest.approx(75 * WAN_SCALE)
        wan.set("us-east", "eu-west", rtt_ms=75 * WAN_SCALE, jitter_ms=0)

    unknown = runner.invoke(app, ["link", "cut", "us-east", "nowhere", *data])
    assert unknown.exit_code == 1 and "unknown region" in unknown.output


@dataclass
class Payer:
    """Payments in a loop through one region, each retried with its key (503, 409, no
    answer: the region add restarts every node) until acknowledged; anything else is a
    failure. Paced (`gap_seconds` after each acknowledgement): a steady stream exercises the
    join as well as a flood does, and a flood only made the test slow on a shared machine."""

    api_url: str
    auth: dict[str, str]
    payer: str
    payee: str
    acked: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    gap_seconds: float = 0.05

    def run(self) -> None:
        with httpx.Client(base_url=self.api_url, timeout=30, headers=self.auth) as http:
            while not self.stop.is_set():
                key = {"Idempotency-Key": f"add-{uuid.uuid4()}"}
                deadline = time.monotonic() + 120
                while True:
                    try:
                        resp = http.post("/v1/payments", headers=key, json={
                            "payer": self.payer, "payee": self.payee, "amount": 1,
                            "currency": "USD"})
                    except httpx.HTTPError:
                        resp = None
                    if resp is not None and resp.status_code == 201:
                        self.acked.append(str(resp.json()["id"]))
                        self.stop.wait(self.gap_seconds)
                        break
                    if resp is not None and resp.status_code not in (503, 409):
                        self.failures.append(resp.text)
                        return
                    if time.monotonic() > deadline:
                        self.failures.append("a payment never went through")
                        return
                    time.sleep(0.05)


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_detached_lab_takes_a_new_region_under_load_and_stops_completely(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "lab"
    cluster = start_cluster(data_dir, regions=3, wan_scale=0.0, detach=True)
    try:
        before = open_account(cluster.region("us-east").api_url, "ap-southeast",
                              cluster.auth_headers())
        wait_for(lambda: account_in_db(cluster.region("us-east").dsn, before), WAIT,
                 "the account to replicate before the new region joins")
        old_nodes = {r.name: r.node.pid for r in cluster.regions if r.node is not None}
        eu = cluster.region("eu-west").api_url
        payer, payee = (open_account(eu, "eu-west", cluster.auth_headers()) for _ in range(2))
        funded = httpx.post(f"{eu}/v1/accounts/{payer}/deposits", json={"amount": 1_000_000},
                            headers=cluster.auth_headers(), timeout=30)
        assert funded.status_code == 201, funded.text
        load = Payer(eu, cluster.auth_headers(), payer, payee)
        worker = threading.Thread(target=load.run)
        worker.start()
        try:
            wait_for(lambda: len(load.acked) >= 5 or load.failures, WAIT, "payments first")
            added = add_region(data_dir, "us-west")  # through cluster.json, as the CLI does
            joined = len(load.acked)
            wait_for(lambda: len(load.acked) >= joined + 5 or load.failures, WAIT,
                     "payments after the new region joined")
        finally:
            load.stop.set()
            worker.join(150)
        assert not worker.is_alive() and load.failures == [], load.failures[:3]
        # Every payment acknowledged during the join is in every region, the new one too,
        # exactly once; the ledgers hold with zero conflicts.
        doc = read_cluster(data_dir)
        dsns = {n: doc["regions"][n]["postgres_dsn"] for n in (*REGION_NAMES, "us-west")}

        def everywhere() -> bool:
            for dsn in dsns.values():
                with psycopg.connect(dsn, autocommit=True) as conn:
                    row = conn.execute("select count(*), count(*) filter (where status = "
                                       "'processing') from payments where id = any(%s::uuid[])",
                                       (load.acked,)).fetchone()
                if row != (len(load.acked), 0):
                    return False
            return True

        wait_for(everywhere, WAIT, "every acknowledged payment in every region")
        assert len(set(load.acked)) == len(load.acked)
        # Zero conflicts everywhere. Apply errors, if any, are streams the join broke
        # under the apply workers while they were busy (they reconnect by themselves):
        # reported, then reset so the ledger checks can run.
        apply_errors = {}
        for name, dsn in dsns.items():
            counts = conflict_counts(dsn)
            assert counts and all(c == 0 for c, _ in counts.values()), (name, counts)
            apply_errors.update({f"{name}/{sub}": e for sub, (_, e) in counts.items() if e})
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("select pg_stat_reset_subscription_stats(oid) from pg_subscription")
            cluster_ledger_checks(dsn, 1_000_000)
        print(f"\n{len(load.acked)} payments through eu-west, {joined} before us-west joined; "
              f"apply errors during the join (reset): {apply_errors}")

        doc = read_cluster(data_dir)
        assert list(doc["regions"]) == [*REGION_NAMES, "us-west"]
        assert len(doc["links"]) == 4 * 3 * len(WAN_SERVICES)
        # Existing nodes were restarted to learn the new peer; the file has their new pids.
        for name, pid in old_nodes.items():
            entry = doc["regions"][name]
            assert entry["node"]["pid"] != pid and is_ours(entry["node"])
            assert "us-west" in entry["peers"]
        # The new region got the data that existed before it joined, and replicates on.
        assert account_in_db(added.dsn, before)
        # The bootstrap admin key came to the new region with the donor's copy.
        after = open_account(added.api_url, "eu-west",
                             cluster.auth_headers())  # forwarded from us-west to eu-west
        for name in (*REGION_NAMES, "us-west"):
            wait_for(lambda n=name: account_in_db(doc["regions"][n]["postgres_dsn"], after),
                     WAIT, f"the new account to reach {name}")
        status = httpx.get(f"{added.api_url}/v1/replication/status", timeout=5,
                           headers=cluster.auth_headers()).json()
        assert {p["from"] for p in status["pairs"].values()} == set(REGION_NAMES)
        assert len(processes_under(data_dir.resolve())) >= 4 * 4 + 1  # the check below sees
    finally:
        stopped = stop_cluster(data_dir)
    kinds = {(region, kind) for region, kind, _ in stopped}
    assert ("wan", "wan") in kinds and ("us-west", "node") in kinds
    doc = read_cluster(data_dir)
    assert doc["status"] == "stopped"
    listed = [doc["wan"]] + [entry for region in doc["regions"].values()
                             for entry in region.values()
                             if isinstance(entry, dict) and "pid" in entry]
    assert not [entry["pid"] for entry in listed if is_ours(entry)]
    # Nor anything unlisted: no process of ours (old nodes included) runs in the lab's dir.
    leftovers = processes_under(data_dir.resolve())
    assert not leftovers, [(p.pid, p.info["cmdline"]) for p in leftovers]
