"""Payments benchmark: automatic payments over HTTP vs pgbench on the same PostgreSQL.

Each round drives `POST /v1/payments` (automatic capture, Idempotency-Key on every
request) from C concurrent clients for a fixed time or a fixed count, then runs pgbench's
TPC-B-like script with the same client count against the SAME PostgreSQL server, so the
ratio payments/s ÷ pgbench tps says how much of the database's raw write throughput a
payment (HTTP + idempotency + double-entry ledger + outbox) turns into.

    python -m bench.payments --duration 10 --concurrency 16      # starts its own region
    python -m bench.payments --api-url http://127.0.0.1:8000 \\
        --pg-dsn postgresql://postgres@127.0.0.1:5432/paycluster  # a running region
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import aiohttp
import httpx
import psycopg
import typer
from psycopg.conninfo import conninfo_to_dict
from rich.table import Table

from bench.runner import ApiKey, BenchError, bench_app, guarded, usage
from bench.stats import CpuMeter, TimedRun, stop_lab
from cluster.console import make_console
from cluster.lab import start_cluster
from cluster.servers import pg_bin
from cluster.stats import percentile

# bench/results/ next to this file (gitignored), whatever the working directory.
DEFAULT_JSON_OUT = Path(__file__).resolve().parent / "results" / "payments.json"
CURRENCY = "USD"
# Funding per payer: enough for any run of this benchmark at the default amount.
PAYER_FUNDING = 1_000_000_000
PGBENCH_DB = "pgbench"
_TPS_RE = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)

console = make_console()


# --------------------------------------------------------------------------- arguments

app = bench_app()


@app.command(help="Automatic payments over HTTP vs pgbench TPC-B on the same PostgreSQL.")
def cli(
        api_url: Annotated[str | None, typer.Option(
            help="REST API of a running region node (default: start one region on embedded "
                 "servers)", rich_help_panel="target")] = None,
        api_key: ApiKey = None,
        pg_dsn: Annotated[str | None, typer.Option(
            help="libpq URL of that region's PostgreSQL (for pgbench); without it pgbench is "
                 "skipped", rich_help_panel="target")] = None,
        node_pid: Annotated[int | None, typer.Option(
            help="pid of the node at --api-url (for its CPU per payment)",
            rich_help_panel="target")] = None,
        pg_pid: Annotated[int | None, typer.Option(
            help="pid of that region's postmaster (for PostgreSQL's CPU per payment)",
            rich_help_panel="target")] = None,
        data_dir: Annotated[Path | None, typer.Option(
            "--data-dir", "-d", help="where a self-started region lives (default: a temp dir)",
            rich_help_panel="target")] = None,
        concurrency: Annotated[int, typer.Option(
            "--concurrency", "-c", min=1, help="clients in flight, for payments and pgbench "
                                               "alike", rich_help_panel="load")] = 16,
        pairs: Annotated[int | None, typer.Option(
            min=1, help="payer/payee pairs (default: = concurrency, so clients do not queue on "
                        "each other's rows)", rich_help_panel="load")] = None,
        hot: Annotated[bool, typer.Option(
            help="one hot pair: every client pays from the same payer to the same payee "
                 "(= --pairs 1)", rich_help_panel="load")] = False,
        duration: Annotated[float, typer.Option(
            "--duration", "-T", min=0.001, help="seconds per round",
            rich_help_panel="load")] = 10.0,
        payments: Annotated[int | None, typer.Option(
            "--payments", "-n", min=1, help="payments per round instead of a duration; "
                                            "pgbench then runs as long as the payments took",
            rich_help_panel="load")] = None,
        amount: Annotated[int, typer.Option(min=1, help="minor units per payment",
                                            rich_help_panel="load")] = 100,
        warmup: Annotated[float, typer.Option(
            min=0.0, help="seconds of unrecorded payments before round 1",
            rich_help_panel="load")] = 2.0,
        rounds: Annotated[int, typer.Option(min=1, help="rounds; medians are quoted",
                                            rich_help_panel="load")] = 3,
        rate: Annotated[float | None, typer.Option(
            min=0.001, help="offered load in payments/s over all clients, each on a fixed "
                            "schedule; latency counts from the scheduled send (issue 13's "
                            "P2: p99 at half the maximum throughput); default: as fast as "
                            "answers come", rich_help_panel="load")] = None,
        no_idempotency_key: Annotated[bool, typer.Option(
            "--no-idempotency-key", help="send payments without Idempotency-Key",
            rich_help_panel="load")] = False,
        no_pgbench: Annotated[bool, typer.Option("--no-pgbench", help="skip pgbench",
                                                 rich_help_panel="pgbench")] = False,
        pgbench_scale: Annotated[int, typer.Option(min=1, help="pgbench -i -s",
                                                   rich_help_panel="pgbench")] = 1,
        pgbench_jobs: Annotated[int, typer.Option(min=1, help="pgbench -j",
                                                  rich_help_panel="pgbench")] = 2,
        json_out: Annotated[Path, typer.Option(help="result file")] = DEFAULT_JSON_OUT,
) -> None:
    """The benchmark's options (also `paycluster bench`); exits with its exit code."""
    if pg_dsn and not api_url:
        raise usage("--pg-dsn needs --api-url (the region it belongs to)")
    args = SimpleNamespace(
        api_url=api_url, api_key=api_key, pg_dsn=pg_dsn, node_pid=node_pid, pg_pid=pg_pid,
        data_dir=data_dir, concurrency=concurrency, pairs=1 if hot else pairs or concurrency,
        hot=hot, duration=duration, payments=payments, amount=amount, rate=rate,
        warmup=warmup,
        rounds=rounds, no_idempotency_key=no_idempotency_key, no_pgbench=no_pgbench,
        pgbench_scale=pgbench_scale, pgbench_jobs=pgbench_jobs, json_out=json_out)
    raise typer.Exit(main(args))


# --------------------------------------------------------------------------- payments

BENCH_RATE_PER_SECOND = 1_000_000
"""The benchmark's own key's rate limit: the highest the API takes. A node's default limit
per key (1,000/s, burst 2,000) is below what one region serves, and a 429 is not what is
measured here. The limiter still runs for every payment, as for any key."""


async def use_bench_key(client: httpx.AsyncClient) -> None:
    """Create an admin principal whose key has the benchmark's rate limit and make `client`
    send that key from now on (the client's key must be an admin's)."""
    resp = await client.post("/v1/admin/principals", json={
        "name": "bench", "role": "admin", "rate_per_second": BENCH_RATE_PER_SECOND,
        "rate_burst": 10 * BENCH_RATE_PER_SECOND})
    if resp.status_code != 201:
        raise BenchError(f"POST /v1/admin/principals -> {resp.status_code}: {resp.text[:300]}")
    client.headers["Authorization"] = f"Bearer {resp.json()['api_key']['key']}"


async def create_pairs(client: httpx.AsyncClient, pairs: int,
                       home_region: str | None = None) -> list[tuple[str, str]]:
    """`pairs` funded payer / payee pairs, homed in `home_region` (default: the region of
    the node `client` talks to)."""
    home = {} if home_region is None else {"home_region": home_region}

    async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = await client.post(path, json=body,
                                 headers={"Idempotency-Key": f"bench-{uuid.uuid4()}"})
        if resp.status_code != 201:
            raise BenchError(f"POST {path} -> {resp.status_code}: {resp.text[:300]}")
        doc: dict[str, Any] = resp.json()
        return doc

    async def pair() -> tuple[str, str]:
        payer = await post("/v1/accounts", {"currency": CURRENCY, "kind": "customer", **home})
        payee = await post("/v1/accounts", {"currency": CURRENCY, "kind": "merchant", **home})
        await post(f"/v1/accounts/{payer['id']}/deposits", {"amount": PAYER_FUNDING})
        return payer["id"], payee["id"]

    gate = asyncio.Semaphore(8)

    async def limited() -> tuple[str, str]:
        async with gate:
            return await pair()

    return list(await asyncio.gather(*(limited() for _ in range(pairs))))


async def drive_payments(client: httpx.AsyncClient, pairs: list[tuple[str, str]],
                         concurrency: int, amount: int, duration: float | None,
                         count: int | None, idempotency: bool = True,
                         rate: float | None = None) -> TimedRun:
    """Run payments from `concurrency` clients until `duration` s pass or `count` are sent.

    With `rate` (payments/s over all clients) client i sends on its own fixed schedule,
    every `concurrency / rate` s, offset by i / rate; a payment's latency counts from its
    scheduled time, so one that had to wait for the client's previous answer is charged the
    wait (no coordinated omission)."""
    run = TimedRun()
    remaining = [count if count is not None else -1]
    deadline = time.perf_counter() + (duration if count is None and duration else math.inf)

    def take() -> bool:
        # One event loop: no lock needed between the check and the decrement.
        if time.perf_counter() >= deadline:
            return False
        if remaining[0] == 0:
            return False
        if remaining[0] > 0:
            remaining[0] -= 1
        return True

    # The payments themselves go through aiohttp (C HTTP parser), not `client` (httpx,
    # pure Python): the load generator shares the CPUs with the node and PostgreSQL,
    # and httpx cost about as much CPU per payment as the node. Same URL and key.
    started = time.perf_counter()
    url = str(client.base_url).rstrip("/") + "/v1/payments"
    auth = client.headers.get("authorization")
    base_headers = {"Content-Type": "application/json"} | (
        {"Authorization": auth} if auth else {})

    async def client_loop(session: aiohttp.ClientSession, i: int) -> None:
        payer, payee = pairs[i % len(pairs)]
        body = json.dumps({"payer": payer, "payee": payee, "amount": amount,
                           "currency": CURRENCY}).encode()
        interval = concurrency / rate if rate else 0.0
        scheduled = started + i / rate if rate else 0.0
        while take():
            headers = ({**base_headers, "Idempotency-Key": f"bench-{uuid.uuid4()}"}
                       if idempotency else base_headers)
            t0 = time.perf_counter()
            if rate:
                if scheduled > t0:
                    await asyncio.sleep(scheduled - t0)
                t0 = scheduled
                scheduled += interval
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    status, raw = resp.status, await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                run.errors += 1
                run.error_kinds[type(exc).__name__] += 1
                continue
            elapsed = (time.perf_counter() - t0) * 1000
            if status == 201 and json.loads(raw).get("status") == "succeeded":
                run.ok += 1
                run.latencies_ms.append(elapsed)
            else:
                run.errors += 1
                run.error_kinds[f"HTTP {status}"] += 1

    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=30.0)) as session:
        await asyncio.gather(*(client_loop(session, i) for i in range(concurrency)))
    run.seconds = time.perf_counter() - started
    run.latencies_ms.sort()
    return run


# --------------------------------------------------------------------------- pgbench

@dataclass
class PgTarget:
    """Where pgbench connects: the same server the region node uses."""

    host: str
    port: int
    user: str
    password: str | None

    @classmethod
    def from_dsn(cls, dsn: str) -> PgTarget:
        """Parse a libpq URL or key=value DSN."""
        parts = conninfo_to_dict(dsn.replace("postgresql+psycopg://", "postgresql://", 1))
        return cls(host=str(parts.get("host") or "127.0.0.1"), port=int(parts.get("port") or 5432),
                   user=str(parts.get("user") or "postgres"),
                   password=str(parts["password"]) if parts.get("password") else None)

    def dsn(self, database: str) -> str:
        """libpq URL of `database` on this server."""
        auth = self.user + (f":{self.password}" if self.password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def args(self) -> list[str]:
        """pgbench connection options."""
        return ["-h", self.host, "-p", str(self.port), "-U", self.user]

    def env(self) -> dict[str, str]:
        """Environment for pgbench (password through PGPASSWORD, never argv)."""
        env = dict(os.environ)
        if self.password:
            env["PGPASSWORD"] = self.password
        return env


def _pgbench_bin() -> str:
    path = pg_bin("pgbench")
    if not path.exists():
        raise BenchError(f"pgbench not found at {path}")
    return str(path)


def pgbench_init(target: PgTarget, scale: int) -> None:
    """Create database `pgbench` (if missing) and load it with `pgbench -i -s scale`."""
    with psycopg.connect(target.dsn("postgres"), autocommit=True) as conn:
        if not conn.execute("select 1 from pg_database where datname = %s",
                            (PGBENCH_DB,)).fetchone():
            conn.execute(f'create database "{PGBENCH_DB}"')
    proc = subprocess.run([_pgbench_bin(), "-i", "-q", "-s", str(scale), *target.args(),
                           PGBENCH_DB], capture_output=True, text=True, env=target.env(),
                          check=False, timeout=600)
    if proc.returncode != 0:
        raise BenchError(f"pgbench -i failed:\n{proc.stderr[-2000:]}")


def pgbench_run(target: PgTarget, clients: int, jobs: int, seconds: int) -> float:
    """Run TPC-B-like pgbench for `seconds`; its tps without connection time."""
    cmd = [_pgbench_bin(), "-c", str(clients), "-j", str(min(jobs, clients)), "-T", str(seconds),
           *target.args(), PGBENCH_DB]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=target.env(), check=False,
                          timeout=seconds + 120)
    match = _TPS_RE.search(proc.stdout)
    if proc.returncode != 0 or not match:
        raise BenchError(f"pgbench failed ({proc.returncode}):\n{proc.stdout[-1000:]}"
                         f"{proc.stderr[-1000:]}")
    return float(match.group(1))


# --------------------------------------------------------------------------- rounds

@dataclass
class Round:
    """The numbers of one round."""

    round: int
    payments: int
    errors: int
    error_kinds: dict[str, int]
    seconds: float
    payments_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    pgbench_tps: float | None
    ratio: float | None
    # CPU milliseconds per successful payment (psutil, over the payment phase of the
    # round): the region node, PostgreSQL (every backend), this load generator.
    cpu_node_ms: float | None = None
    cpu_pg_ms: float | None = None
    cpu_client_ms: float | None = None
    # pgbench's PostgreSQL CPU per transaction, in the same round (the baseline's cost).
    cpu_pg_per_tpcb_ms: float | None = None


METRICS = ("payments_per_s", "p50_ms", "p95_ms", "p99_ms", "errors", "pgbench_tps", "ratio",
           "cpu_node_ms", "cpu_pg_ms", "cpu_client_ms", "cpu_pg_per_tpcb_ms")


def medians(rounds: list[Round]) -> dict[str, float | None]:
    """Median of each metric over the rounds (None where a metric was not measured)."""
    out: dict[str, float | None] = {}
    for name in METRICS:
        values = [v for r in rounds if (v := getattr(r, name)) is not None and not math.isnan(v)]
        out[name] = statistics.median(values) if values else None
    return out


def _meter(args: SimpleNamespace) -> CpuMeter:
    pids: dict[str, tuple[int, bool]] = {}
    if args.node_pid:
        pids["node"] = (args.node_pid, True)
    if args.pg_pid:
        pids["postgres"] = (args.pg_pid, True)
    return CpuMeter(pids)


def _per(used: dict[str, float], name: str, count: int) -> float | None:
    if name not in used or count <= 0:
        return None
    return round(used[name] * 1000 / count, 3)


async def _bench_rounds(args: SimpleNamespace, api_url: str,
                        target: PgTarget | None) -> list[Round]:
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    async with httpx.AsyncClient(base_url=api_url, timeout=30.0, limits=limits,
                                 headers=headers) as client:
        with console.status(f"creating {args.pairs} payer/payee pairs ..."):
            await use_bench_key(client)
            pairs = await create_pairs(client, args.pairs)
        if args.warmup > 0:
            with console.status(f"warming up for {args.warmup:g}s ..."):
                await drive_payments(client, pairs, args.concurrency, args.amount,
                                     args.warmup, None, not args.no_idempotency_key,
                                     args.rate)
        rounds: list[Round] = []
        for n in range(1, args.rounds + 1):
            what = (f"{args.payments} payments" if args.payments else f"{args.duration:g}s")
            with console.status(f"round {n}/{args.rounds}: payments ({what}, "
                                f"{args.concurrency} clients) ..."):
                meter = _meter(args)
                meter.start()
                run = await drive_payments(client, pairs, args.concurrency, args.amount,
                                           args.duration, args.payments,
                                           not args.no_idempotency_key, args.rate)
                used = meter.stop()
            tps: float | None = None
            pg_per_tpcb: float | None = None
            if target is not None:
                seconds = max(1, math.ceil(run.seconds if args.payments else args.duration))
                with console.status(f"round {n}/{args.rounds}: pgbench -c {args.concurrency} "
                                    f"-T {seconds} ..."):
                    # pgbench blocks; run it off the event loop (nothing else runs meanwhile).
                    pg_meter = _meter(args)
                    pg_meter.start()
                    tps = await asyncio.to_thread(pgbench_run, target, args.concurrency,
                                                  args.pgbench_jobs, seconds)
                    pg_used = pg_meter.stop()
                    pg_per_tpcb = _per(pg_used, "postgres", round(tps * seconds))
            lat = run.latencies_ms
            r = Round(n, run.ok, run.errors, dict(run.error_kinds), round(run.seconds, 3),
                      round(run.per_second, 1), round(percentile(lat, 50), 2),
                      round(percentile(lat, 95), 2), round(percentile(lat, 99), 2),
                      round(tps, 1) if tps is not None else None,
                      round(run.per_second / tps, 4) if tps else None,
                      _per(used, "node", run.ok), _per(used, "postgres", run.ok),
                      _per(used, "client", run.ok), pg_per_tpcb)
            rounds.append(r)
            console.print(f"round {n}: {r.payments_per_s:.0f} payments/s, p99 {r.p99_ms:.1f} ms, "
                          f"{r.errors} errors" + (f", pgbench {tps:.0f} tps" if tps else "")
                          + f"; CPU ms/payment node {_fmt(r.cpu_node_ms, 2)}, "
                          f"PostgreSQL {_fmt(r.cpu_pg_ms, 2)}, client {_fmt(r.cpu_client_ms, 2)}")
        return rounds


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def print_table(rounds: list[Round], median: dict[str, float | None]) -> None:
    """Rich table: a row per round and the medians."""
    table = Table(title="payments over HTTP vs pgbench TPC-B (same PostgreSQL)",
                  caption="ratio = payments/s ÷ pgbench tps")
    for col in ("round", "payments/s", "p50 ms", "p95 ms", "p99 ms", "errors", "pgbench tps",
                "ratio", "CPU ms/pay node", "CPU ms/pay PG", "CPU ms/pay client",
                "PG CPU ms/TPC-B"):
        table.add_column(col, justify="right")
    for r in rounds:
        table.add_row(str(r.round), _fmt(r.payments_per_s), _fmt(r.p50_ms, 2), _fmt(r.p95_ms, 2),
                      _fmt(r.p99_ms, 2), str(r.errors), _fmt(r.pgbench_tps),
                      _fmt(r.ratio, 3), _fmt(r.cpu_node_ms, 2), _fmt(r.cpu_pg_ms, 2),
                      _fmt(r.cpu_client_ms, 2), _fmt(r.cpu_pg_per_tpcb_ms, 2))
    table.add_row("median", _fmt(median["payments_per_s"]), _fmt(median["p50_ms"], 2),
                  _fmt(median["p95_ms"], 2), _fmt(median["p99_ms"], 2),
                  _fmt(median["errors"], 0), _fmt(median["pgbench_tps"]),
                  _fmt(median["ratio"], 3), _fmt(median["cpu_node_ms"], 2),
                  _fmt(median["cpu_pg_ms"], 2), _fmt(median["cpu_client_ms"], 2),
                  _fmt(median["cpu_pg_per_tpcb_ms"], 2), style="bold")
    console.print(table)


def _server_version(target: PgTarget | None) -> str | None:
    if target is None:
        return None
    try:
        with psycopg.connect(target.dsn("postgres"), connect_timeout=5) as conn:
            row = conn.execute("show server_version").fetchone()
            return str(row[0]) if row else None
    except psycopg.Error:
        return None


def _write_json(path: Path, args: SimpleNamespace, api_url: str, target: PgTarget | None,
                self_started: bool, rounds: list[Round],
                median: dict[str, float | None]) -> None:
    doc = {
        "benchmark": "payments",
        "finished_at": datetime.now(UTC).isoformat(),
        "config": {"api_url": api_url, "self_started": self_started,
                   "concurrency": args.concurrency, "pairs": args.pairs,
                   "duration_s": None if args.payments else args.duration,
                   "payments_per_round": args.payments, "amount": args.amount,
                   "rate_per_s": args.rate,
                   "warmup_s": args.warmup, "rounds": args.rounds,
                   "idempotency_key": not args.no_idempotency_key,
                   "pgbench": None if target is None else {
                       "scale": args.pgbench_scale, "clients": args.concurrency,
                       "jobs": min(args.pgbench_jobs, args.concurrency),
                       "host": target.host, "port": target.port}},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), "postgres": _server_version(target)},
        "rounds": [asdict(r) for r in rounds],
        "median": median,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _run(args: SimpleNamespace, api_url: str, pg_dsn: str | None, self_started: bool) -> int:
    target = PgTarget.from_dsn(pg_dsn) if pg_dsn and not args.no_pgbench else None
    if target is not None:
        with console.status(f"pgbench -i -s {args.pgbench_scale} into database "
                            f"{PGBENCH_DB} on {target.host}:{target.port} ..."):
            pgbench_init(target, args.pgbench_scale)
    elif not args.no_pgbench:
        console.print("[yellow]no --pg-dsn: pgbench skipped[/]")
    rounds = asyncio.run(_bench_rounds(args, api_url, target))
    median = medians(rounds)
    print_table(rounds, median)
    _write_json(args.json_out, args, api_url, target, self_started, rounds, median)
    console.print(f"results: {args.json_out}")
    return 0 if all(r.payments > 0 for r in rounds) else 1


def main(args: SimpleNamespace) -> int:
    """Run the benchmark; returns the process exit code."""
    def measure() -> int:
        if args.api_url:
            return _run(args, args.api_url.rstrip("/"), args.pg_dsn, self_started=False)
        return _self_started(args)

    return guarded(measure, console)


def _self_started(args: SimpleNamespace) -> int:
    temp = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="paycluster-bench-")) if temp else args.data_dir
    with console.status("starting one region on embedded PostgreSQL, Redis, NATS ..."):
        cluster = start_cluster(data_dir, regions=1, detach=False)
    code = 1
    try:
        region = cluster.regions[0]
        args.api_key = cluster.admin_key
        if region.node is not None:
            args.node_pid = region.node.pid
        args.pg_pid = region.servers.postgres.pid
        console.print(f"region {region.name} at {region.api_url}, PostgreSQL "
                      f"127.0.0.1:{region.servers.postgres.port}")
        code = _run(args, region.api_url, region.servers.postgres.dsn("paycluster"),
                    self_started=True)
        return code
    finally:
        stop_lab(cluster, console, "region", data_dir if temp else None, keep=code != 0)


if __name__ == "__main__":
    app(prog_name="python -m bench.payments")
