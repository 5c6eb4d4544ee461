"""What the encrypted links between regions cost: gRPC Forward with and without mutual TLS,
and replication lag through the TLS gateways versus a plaintext connection.

    python -m bench.tls_cost [--calls 500] [--updates 200] [--only grpc|replication]

1. gRPC: two in-process nodes of one region on real servers, one serving mutual TLS and
   one plaintext; `Forward(GET /health/live)` timed `--calls` times on a warm channel
   (the steady state between regions), and 50 times on a new channel each (a handshake
   per call: what a reconnect costs).
2. Replication: a two-region lab without WAN delay. eu-west's subscription to us-east
   first runs as the lab runs it (client gateway -> WAN link -> server gateway -> unix
   socket, as the replication role), then is pointed at a plaintext WAN link straight to
   us-east's PostgreSQL port (as postgres, what the lab did before TLS); each time
   `--updates` commits of one row at us-east are timed until eu-west sees them.

Prints medians and p99 of each, and the TLS/plaintext ratios.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from enum import StrEnum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import psycopg
import typer

from bench.runner import bench_app
from cluster.lab import start_cluster
from cluster.pki import ensure_cluster_pki
from cluster.servers import free_port, start_region_servers
from cluster.stats import percentile
from region_node.forwarding import ForwardedRequest
from region_node.rpc.client import PeerClients
from region_node.rpc.tls import RpcTls
from replication.wiring import subscribe, wait_until_replicating


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": round(statistics.median(ordered), 3),
            "p99_ms": round(percentile(ordered, 99), 3), "n": len(ordered)}


async def _forward_times(target: str, tls: RpcTls | None, calls: int,
                         new_channel: bool) -> list[float]:
    request = ForwardedRequest(method="GET", path="/health/live", origin_region="eu-west")
    times: list[float] = []
    # The plaintext side is the test-only loopback mode (the cost baseline).
    clients = PeerClients("eu-west", {"us-east": target}, 5.0, tls=tls,
                          insecure_loopback_only=tls is None)
    try:
        for _ in range(20):  # warm up: connect, handshake, first-call costs
            await clients.forward("us-east", request)
        for _ in range(calls):
            if new_channel:
                await clients.close()
            started = time.perf_counter()
            await clients.forward("us-east", request)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        await clients.close()
    return times


async def grpc_cost(base: Path, calls: int) -> dict[str, Any]:
    """Forward latency against a mutual-TLS node and a plaintext node (same servers)."""
    from region_node.app import create_app
    from region_node.config import RegionSettings
    from region_node.migrate import upgrade

    files = ensure_cluster_pki(base, ["us-east", "eu-west"])
    servers = start_region_servers("us-east", base / "servers")
    try:
        upgrade(servers.postgres.dsn("paycluster"))
        ports = {"tls": free_port(), "plain": free_port()}
        common: dict[str, Any] = {
            "region": "us-east", "database_url": servers.postgres.dsn("paycluster"),
            "redis_url": servers.redis.url, "nats_url": servers.nats.url, "run_workers": False}
        us = files["us-east"]
        tls_app = create_app(RegionSettings(**common, grpc_port=ports["tls"],
                                            tls_ca_file=str(us.ca_file),
                                            tls_cert_file=str(us.cert_file),
                                            tls_key_file=str(us.key_file)))
        plain_app = create_app(RegionSettings(**common, grpc_port=ports["plain"],
                                              grpc_insecure_loopback_only=True))
        eu = files["eu-west"]
        client_tls = RpcTls.from_files(eu.ca_file, eu.cert_file, eu.key_file)
        async with tls_app.router.lifespan_context(tls_app), \
                plain_app.router.lifespan_context(plain_app):
            out: dict[str, Any] = {}
            # Interleaved rounds, so a noisy neighbour hurts both sides alike.
            warm: dict[str, list[float]] = {"tls": [], "plain": []}
            for _ in range(5):
                warm["plain"] += await _forward_times(f"127.0.0.1:{ports['plain']}", None,
                                                      calls // 5, False)
                warm["tls"] += await _forward_times(f"127.0.0.1:{ports['tls']}", client_tls,
                                                    calls // 5, False)
            out["forward_plain"] = _summary(warm["plain"])
            out["forward_tls"] = _summary(warm["tls"])
            out["forward_new_channel_plain"] = _summary(await _forward_times(
                f"127.0.0.1:{ports['plain']}", None, 50, True))
            out["forward_new_channel_tls"] = _summary(await _forward_times(
                f"127.0.0.1:{ports['tls']}", client_tls, 50, True))
            return out
    finally:
        servers.stop()


def _lag_times(pub_dsn: str, sub_dsn: str, updates: int) -> list[float]:
    times: list[float] = []
    with psycopg.connect(pub_dsn, autocommit=True) as pub, \
            psycopg.connect(sub_dsn, autocommit=True) as sub:
        for _ in range(updates):
            started = time.perf_counter()
            row = pub.execute("update heartbeats set seq = seq + 1, sent_at = clock_timestamp()"
                              " where region = 'tlsbench' returning seq").fetchone()
            assert row is not None
            seq = int(row[0])
            deadline = started + 10
            while True:
                got = sub.execute("select seq from heartbeats where region = 'tlsbench'"
                                  ).fetchone()
                if got is not None and int(got[0]) >= seq:
                    break
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"update {seq} not replicated after 10 s")
                time.sleep(0.0002)
            times.append((time.perf_counter() - started) * 1000)
    return times


def _wait_walsender_user(dsn: str, user: str, timeout: float = 60.0) -> None:
    """Wait until the publisher streams to the subscriber as `user` (after a connection
    change the apply worker restarts; measuring before would time the reconnect)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            users = [r[0] for r in conn.execute(
                "select usename from pg_stat_replication where state = 'streaming'")]
            if users == [user]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"walsenders are {users}, not [{user!r}]")
            time.sleep(0.05)


def replication_cost(base: Path, updates: int) -> dict[str, Any]:
    """Commit-to-visible lag us-east -> eu-west through the TLS gateways, then plaintext."""
    lab = start_cluster(base / "lab", regions=2, wan_scale=0)
    try:
        us, eu = lab.region("us-east"), lab.region("eu-west")
        for region in lab.regions:
            wait_until_replicating(region.dsn, timeout_seconds=60)
        with psycopg.connect(us.dsn, autocommit=True) as conn:
            conn.execute("insert into heartbeats (region, seq, sent_at)"
                         " values ('tlsbench', 0, clock_timestamp())")
        assert lab.pg_tls is not None
        gateway_port = lab.pg_tls.client_port("eu-west", "us-east")
        with lab.wan_control() as wan:
            plain = wan.add("eu-west", "us-east", "postgres-plain", "127.0.0.1",
                            us.servers.postgres.port, rtt_ms=0)
        from replication.tls import REPLICATION_ROLE

        ways = {"tls": ("127.0.0.1", gateway_port, REPLICATION_ROLE),
                "plain": ("127.0.0.1", int(plain["listen_port"]), "postgres")}
        lags: dict[str, list[float]] = {"tls": [], "plain": []}
        rounds = 4
        # Alternating rounds, so load from anything else on the machine hits both alike.
        for _ in range(rounds):
            for way, (host, port, user) in ways.items():
                subscribe(eu.dsn, "eu-west", "us-east", host, port, user=user)
                _wait_walsender_user(us.dsn, user)
                _lag_times(us.dsn, eu.dsn, 10)  # warm up the new connection
                lags[way] += _lag_times(us.dsn, eu.dsn, max(1, updates // rounds))
        # Back to the way the lab runs (the last round was plaintext).
        subscribe(eu.dsn, "eu-west", "us-east", *ways["tls"][:2], user=REPLICATION_ROLE)
        out: dict[str, Any] = {"lag_tls_gateways": _summary(lags["tls"]),
                               "lag_plaintext": _summary(lags["plain"])}
        return out
    finally:
        lab.stop()


app = bench_app()


class Only(StrEnum):
    """Which of the two measurements to run."""

    grpc = "grpc"
    replication = "replication"


@app.command(help="What TLS costs: gRPC forwards and replication lag through the TLS "
                  "gateways, each against plaintext.")
def main(calls: Annotated[int, typer.Option(min=1, help="gRPC forwards per variant")] = 500,
         updates: Annotated[int, typer.Option(min=1, help="replicated updates per "
                                                          "variant")] = 200,
         only: Annotated[Only | None, typer.Option(help="run one measurement only")] = None,
         ) -> None:
    """Run both measurements and print them with the TLS/plaintext ratios."""
    args = SimpleNamespace(calls=calls, updates=updates, only=only)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tls-cost-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        if args.only in (None, "grpc"):
            results.update(asyncio.run(grpc_cost(base / "grpc", args.calls)))
        if args.only in (None, "replication"):
            results.update(replication_cost(base / "repl", args.updates))
    for name, value in results.items():
        print(f"{name:28s} {value}")
    for a, b in (("forward_tls", "forward_plain"),
                 ("forward_new_channel_tls", "forward_new_channel_plain"),
                 ("lag_tls_gateways", "lag_plaintext")):
        if a not in results:
            continue
        print(f"ratio {a}/{b}: median "
              f"{results[a]['median_ms'] / results[b]['median_ms']:.2f}x, p99 "
              f"{results[a]['p99_ms'] / results[b]['p99_ms']:.2f}x")


if __name__ == "__main__":
    app(prog_name="python -m bench.tls_cost")
