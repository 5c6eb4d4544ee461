"""The containerised deployment's steps (`paycluster deploy ...`, cluster/deploy.py) run for
real on one host: the same commands the compose file's jobs and sidecars run, against
real PostgreSQL 18 / Redis / NATS servers, with a topology that names 127.0.0.1 instead
of container hosts. Two regions come up wired through the WAN emulator and the TLS
gateways exactly as in the containers, and serve a cross-region payment.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.deploy import Topology, gateway_specs, node_env, region_dbs, wan_links
from cluster.nodes import NodeProcess, start_node
from cluster.servers import RegionServers, free_port, spawn, start_region_servers, stop_pid

pytestmark = [pytest.mark.integration, pytest.mark.multiregion, pytest.mark.slow]

REGIONS = ("us-east", "eu-west")
COMPOSE_TOPOLOGY = Path(__file__).resolve().parent.parent / "deploy/compose/topology.json"


def _free_block(size: int, step: int = 1) -> int:
    """A base port whose `size` ports (every `step`) are free on 127.0.0.1 right now."""
    for _ in range(50):
        base = free_port()
        ports = [base + i * step for i in range(size)]
        try:
            socks = []
            for port in ports:
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise RuntimeError("no free block of ports")


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, ["deploy", *args])
    assert result.exit_code == 0, f"{args}: {result.output}\n{result.exception!r}"
    return result.output


def _wait_line(log: Path, key: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while key not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, Path,
                                                                            dict[str, str]]]:
    """Two regions brought up by the deploy commands; everything stopped by pid after."""
    base = tmp_path_factory.mktemp("deploy")
    servers: dict[str, RegionServers] = {}
    procs: list[subprocess.Popen[bytes]] = []
    nodes: list[NodeProcess] = []
    try:
        for name in REGIONS:
            servers[name] = start_region_servers(name, base, gateway=True)
        grpc = {name: free_port() for name in REGIONS}
        topo_doc = {
            "regions": [{
                "name": name, "postgres": f"127.0.0.1:{s.postgres.port}",
                "database": "paycluster", "pg_socket": str(s.postgres.socket_path),
                "pg_tls": f"127.0.0.1:{_free_block(len(REGIONS) + 1)}",
                "grpc": f"127.0.0.1:{grpc[name]}", "redis": f"127.0.0.1:{s.redis.port}",
                "nats": f"127.0.0.1:{s.nats.port}"} for name, s in servers.items()],
            "pki_dir": str(base / "pki"), "secrets_dir": str(base / "secrets"),
            "wan": {"host": "127.0.0.1", "base_port": _free_block(len(REGIONS) * 100),
                    "control_port": free_port(), "rtt_scale": 0.1},
            "listen_host": "127.0.0.1"}
        topology = base / "topology.json"
        topology.write_text(json.dumps(topo_doc))
        topo = Topology.load(topology)
        cli = str(Path(sys.executable).parent / "paycluster")

        _run("pki", "--topology", str(topology))
        _run("migrate", "--topology", str(topology))
        wan_log = base / "wan.log"
        procs.append(spawn([cli, "deploy", "wan", "--topology", str(topology)], wan_log))
        _wait_line(wan_log, "control_url", procs[-1])
        for name in REGIONS:
            log = base / f"pgtls-{name}.log"
            procs.append(spawn([cli, "deploy", "pg-tls", "--region", name, "--topology",
                                str(topology)], log))
            _wait_line(log, "pg_tls_ready", procs[-1])
        wired = json.loads(_run("wire", "--topology", str(topology)))
        assert sorted(wired["created"]) == ["eu-west<-us-east", "us-east<-eu-west"]
        _run("bootstrap", "--topology", str(topology))
        for name in REGIONS:
            env = node_env(topo, name)
            nodes.append(start_node(name, servers[name], base, extra_env=env))
        urls = {n.region: f"http://127.0.0.1:{n.port}" for n in nodes}
        # The geo router as the compose file runs it: catalog inline, its key from the
        # bootstrap job's secrets folder.
        router_log = base / "router.log"
        procs.append(spawn([sys.executable, "-m", "geo_router"], router_log, env={
            **os.environ, "PYTHONUNBUFFERED": "1",
            "PAYCLUSTER_ROUTER_CATALOG": json.dumps(
                [{"name": r, "endpoint": u} for r, u in urls.items()]),
            "PAYCLUSTER_ROUTER_API_KEY": (topo.secrets_dir / "router_key").read_text().strip(),
            "PAYCLUSTER_ROUTER_PORT": "0", "PAYCLUSTER_ROUTER_ADMIN_PORT": "0",
            "PAYCLUSTER_ROUTER_PROBE_INTERVAL_SECONDS": "1.0",
            "PAYCLUSTER_ROUTER_PROBE_TIMEOUT_SECONDS": "1.0"}))
        _wait_line(router_log, "router_url", procs[-1])
        urls["router"] = next(json.loads(line)["router_url"] for line in
                              router_log.read_text().splitlines() if '"router_url"' in line)
        yield topo, topology, urls
    finally:
        for node in nodes:
            node.stop()
        for proc in procs:
            stop_pid(proc.pid)
            proc.wait(10)
        for region in servers.values():
            region.stop()


def test_deploy_steps_bring_up_two_wired_regions(
        deployed: tuple[Topology, Path, dict[str, str]]) -> None:
    topo, topology, urls = deployed
    admin = (topo.secrets_dir / "admin_key").read_text().strip()
    assert (topo.secrets_dir / "admin_key").stat().st_mode & 0o077 == 0, "key file is 0600"
    headers = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(headers=headers, timeout=20) as client:
        payer = client.post(f"{urls['us-east']}/v1/accounts", json={"currency": "EUR"}).json()
        assert client.post(f"{urls['us-east']}/v1/accounts/{payer['id']}/deposits",
                           json={"amount": 5_000}).status_code in (200, 201)
        payee = client.post(f"{urls['eu-west']}/v1/accounts", json={"currency": "EUR"}).json()
        # Sent to eu-west, the payer lives in us-east: a forward over the WAN's gRPC link
        # (mutual TLS), then the saga's push back; replication carries the rest.
        paid = client.post(f"{urls['eu-west']}/v1/payments", json={
            "payer": payer["id"], "payee": payee["id"], "amount": 1_200, "currency": "EUR"})
        assert paid.status_code == 201, paid.text
        assert paid.headers["paycluster-served-by"] == "us-east"
        deadline = time.monotonic() + 30
        while True:
            seen = client.get(f"{urls['eu-west']}/v1/payments/{paid.json()['id']}")
            account = client.get(f"{urls['eu-west']}/v1/accounts/{payee['id']}").json()
            if seen.status_code == 200 and seen.json()["status"] == "succeeded" \
                    and account["balance"] == 1_200:
                break
            assert time.monotonic() < deadline, (seen.text, account)
            time.sleep(0.2)
    # Replication crossed the gateways as the replication role, not as a superuser.
    for region in topo.regions:
        with psycopg.connect(region.dsn, autocommit=True) as conn:
            subs = conn.execute("select subname, subconninfo from pg_subscription").fetchall()
            conflicts = conn.execute(
                "select coalesce(sum(confl_insert_exists + confl_update_origin_differs), 0) "
                "from pg_stat_subscription_stats").fetchone()
        assert len(subs) == 1 and "user=paycluster_repl" in subs[0][1]
        assert conflicts == (0,)
    # Running the jobs again (a second `docker compose up`) changes nothing.
    before = (topo.secrets_dir / "admin_key").read_text()
    assert json.loads(_run("wire", "--topology", str(topology)))["created"] == []
    _run("bootstrap", "--topology", str(topology))
    assert (topo.secrets_dir / "admin_key").read_text() == before


def test_link_cut_and_heal_through_the_deploy_command(
        deployed: tuple[Topology, Path, dict[str, str]]) -> None:
    _topo, topology, _urls = deployed
    cut = [json.loads(line) for line in _run(
        "link", "cut", "us-east", "eu-west", "--topology", str(topology)).splitlines()]
    assert {(c["src"], c["dst"]) for c in cut} == {("us-east", "eu-west"),
                                                  ("eu-west", "us-east")}
    assert all(c["cut"] for c in cut)
    healed = [json.loads(line) for line in _run(
        "link", "heal", "us-east", "eu-west", "--topology", str(topology)).splitlines()]
    assert not any(c["cut"] for c in healed)


def test_partition_drill_on_the_deployed_cluster(
        deployed: tuple[Topology, Path, dict[str, str]]) -> None:
    """`paycluster deploy drill`: eu-west cut off under load through the router, healed.
    With two regions neither side keeps a majority, so only the region's own fencing,
    recovery, convergence and the books are judged (the majority check needs three)."""
    _topo, topology, urls = deployed
    result = CliRunner().invoke(app, [
        "deploy", "drill", "--region", "eu-west", "--router", urls["router"],
        "--before", "2", "--partition", "6", "--after", "8", "--rate", "8",
        "--topology", str(topology)])
    report = json.loads(result.output.split("\nPASS")[0].split("\nFAIL")[0])
    assert result.exit_code == 0, result.output
    assert report["during"]["failed"] > 0
    assert set(report["during"]["errors"]) & {"lease_lost", "region_unavailable"}, \
        report["during"]["errors"]
    assert report["after_heal"]["rto_first"] is not None
    assert report["loss"]["acknowledged"] > 0 and report["loss"]["rpo_count"] == 0
    assert report["conflicts"] == 0
    print(f"drill: {report['during']['failed']} failed attempts while cut off "
          f"({report['during']['errors']}), first success {report['after_heal']['rto_first']}"
          f" s after the heal, converged {report['converged_after']} s after it")


def test_compose_topology_derives_distinct_ports_for_every_link() -> None:
    topo = Topology.load(COMPOSE_TOPOLOGY)
    links = wan_links(topo)
    assert len(links) == 3 * 2 * 3  # ordered pairs x services
    assert len({link["listen_port"] for link in links}) == len(links)
    # The lab's round-trip table: us-east <-> eu-west 75 ms.
    assert {link["rtt_ms"] for link in links
            if {link["src"], link["dst"]} == {"us-east", "eu-west"}} == {75.0}


def test_a_topology_without_gateways_wires_directly_with_a_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A managed PostgreSQL (terraform/modules/replication): no gateways, subscriptions
    reach the publisher's own address and log in with the replication role's password."""
    doc = json.loads(COMPOSE_TOPOLOGY.read_text())
    for region in doc["regions"]:
        region["postgres"] = f"pg.{region['name']}.paycluster.internal:5432"
        del region["pg_tls"], region["pg_socket"]
    doc["replication_password_env"] = "REPLICATION_PASSWORD"
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(doc))
    topo = Topology.load(path)
    with pytest.raises(ValueError, match="REPLICATION_PASSWORD"):
        region_dbs(topo)
    monkeypatch.setenv("REPLICATION_PASSWORD", "s3cret-for-the-test")
    dbs = region_dbs(topo)
    assert dbs["eu-west"].replication_password == "s3cret-for-the-test"
    assert dbs["eu-west"].endpoint_for("us-east") == ("pg.eu-west.paycluster.internal", 5432)
    assert "s3cret" not in repr(dbs["eu-west"])
    with pytest.raises(ValueError, match="no TLS gateway"):
        gateway_specs(topo, "us-east")


def test_replication_role_gets_the_password_it_logs_in_with(servers: RegionServers) -> None:
    from replication.tls import REPLICATION_ROLE, ensure_replication_role

    with psycopg.connect(servers.postgres.dsn(), autocommit=True) as conn:
        ensure_replication_role(conn, [], "pw-for-the-test")
        row = conn.execute("select rolreplication, rolpassword from pg_authid "
                           "where rolname = %s", (REPLICATION_ROLE,)).fetchone()
        assert row is not None and row[0] is True and str(row[1]).startswith("SCRAM-SHA-256$")
