"""Benchmark: what `regional` durability costs a commit, against `local`, same cluster.

Starts its own lab at the default WAN scale (1.0: real inter-region round trips) and, in
one region (default us-east, its buddy the nearest region: eu-west, 75 ms away), runs
the same workload in both modes, switching the region's mode at runtime
(`replication.durability.set_durability`) between measurements:

- **payments**: local payments (payer and payee homed in the measured region) from C
  concurrent clients for T seconds, over HTTP with an Idempotency-Key each;
- **SQL commits**: one-row inserts into a scratch table (published like the ledger, so
  the buddy applies and flushes each one) from one psycopg connection, one after the
  other: the bare price of a commit, without the application.

Each round measures both modes back to back and the order alternates between rounds, so
drift in the machine's state hits both; medians over the rounds are quoted, with the
regional/local ratios and the buddy round trip for context.

    python -m bench.durability [-c 8] [-T 10] [--rounds 3] [--region us-east]
    paycluster durability bench [same options]

Prints a table, writes JSON (default bench/results/durability.json).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import httpx
import psycopg
import typer
from psycopg import sql
from rich.table import Table

from bench.payments import create_pairs, drive_payments
from bench.runner import BenchError, bench_app, guarded, usage
from bench.stats import stop_lab
from cluster.console import make_console
from cluster.durability import default_buddy, wait_sync
from cluster.lab import REGION_NAMES, Cluster, start_cluster
from cluster.stats import percentile
from cluster.wan import link_rtt
from replication.durability import MODES, durability, set_durability
from replication.wiring import PUBLICATION, subscription_name

DEFAULT_JSON_OUT = Path(__file__).resolve().parent / "results" / "durability.json"
SCRATCH = "bench_commits"
"""The scratch table of the SQL commits: in every region, published by the measured one."""

console = make_console()


# --------------------------------------------------------------------------- arguments

app = bench_app()


@app.command(help="Commit latency and throughput of regional vs local durability, same "
                  "cluster, same run.")
def cli(
        regions: Annotated[int, typer.Option(
            "--regions", "-n", min=2, max=len(REGION_NAMES),
            help="regions of the lab (the default lab has 3)")] = 3,
        wan_scale: Annotated[float, typer.Option(
            min=0.0, help="multiplier of the default round trips")] = 1.0,
        region: Annotated[str, typer.Option(
            "--region", "-r", help="the measured region")] = REGION_NAMES[0],
        buddy: Annotated[str | None, typer.Option(
            help="its buddy in regional mode (default: the nearest region)")] = None,
        concurrency: Annotated[int, typer.Option(
            "--concurrency", "-c", min=1, help="payment clients")] = 8,
        duration: Annotated[float, typer.Option(
            "--duration", "-T", min=0.001, help="seconds of payments per mode and round")] = 10.0,
        rounds: Annotated[int, typer.Option(
            min=1, help="rounds; each measures both modes, alternating the order")] = 3,
        sql_commits: Annotated[int, typer.Option(
            min=1, help="sequential SQL commits per mode and round")] = 50,
        warmup: Annotated[float, typer.Option(
            min=0.0, help="seconds of unrecorded payments before round 1")] = 2.0,
        amount: Annotated[int, typer.Option(min=1, help="minor units per payment")] = 1,
        data_dir: Annotated[Path | None, typer.Option(
            "--data-dir", "-d", help="where the lab lives (default: a temp dir)")] = None,
        json_out: Annotated[Path, typer.Option(help="result file")] = DEFAULT_JSON_OUT,
) -> None:
    """The benchmark's options (also `paycluster durability bench`); exits with its exit
    code."""
    names = REGION_NAMES[:regions]
    if region not in names:
        raise usage(f"--region must be one of {', '.join(names)}")
    buddy = buddy or default_buddy(region, names)
    if buddy not in names or buddy == region:
        raise usage(f"--buddy must be another region of {', '.join(names)}")
    args = SimpleNamespace(regions=regions, wan_scale=wan_scale, region=region, buddy=buddy,
                           concurrency=concurrency, duration=duration, rounds=rounds,
                           sql_commits=sql_commits, warmup=warmup, amount=amount,
                           data_dir=data_dir, json_out=json_out)
    raise typer.Exit(main(args))


# --------------------------------------------------------------------------- setup


def api_headers(cluster: Cluster) -> dict[str, str]:
    """The one place the benchmark's API credentials come from: the lab's bootstrap
    admin key."""
    return cluster.auth_headers()


def create_scratch(cluster: Cluster, region: str) -> None:
    """The scratch table in every region, published by `region` and subscribed to by the
    others (so a commit into it costs what a ledger commit costs: the buddy applies it).

    Only `region` ever inserts (random UUIDs): no conflicts. The lab is ours and thrown
    away, so the publication is not put back.
    """
    from replication.tls import REPLICATION_ROLE

    table = sql.Identifier(SCRATCH)
    for other in cluster.regions:
        with psycopg.connect(other.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("create table if not exists {} (id uuid primary key, "
                                 "at timestamptz not null default now())").format(table))
            if conn.execute("select 1 from pg_roles where rolname = %s",
                            (REPLICATION_ROLE,)).fetchone():
                conn.execute(sql.SQL("grant select on {} to {}").format(
                    table, sql.Identifier(REPLICATION_ROLE)))
    with psycopg.connect(cluster.region(region).dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("alter publication {} add table {}").format(
            sql.Identifier(PUBLICATION), table))
    for other in cluster.regions:
        if other.name != region:
            with psycopg.connect(other.dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("alter subscription {} refresh publication "
                                     "with (copy_data = false)").format(
                    sql.Identifier(subscription_name(region))))


def sql_commits(dsn: str, count: int) -> list[float]:
    """`count` one-row insert commits, one after the other on one connection; their
    latencies (ms), ascending."""
    latencies: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        statement = sql.SQL("insert into {} (id) values (%s)").format(sql.Identifier(SCRATCH))
        for _ in range(count):
            t0 = time.perf_counter()
            conn.execute(statement, (uuid.uuid4(),))
            latencies.append((time.perf_counter() - t0) * 1000)
    return sorted(latencies)


def switch(cluster: Cluster, region: str, buddy: str, mode: str) -> str | None:
    """Put `region` in `mode` (regional: with `buddy`); once regional, wait until the
    buddy is a ``sync`` standby. Returns the buddy's sync_state."""
    dsns = {r.name: r.dsn for r in cluster.regions}
    set_durability(dsns[region], region, mode, buddy if mode == "regional" else None,
                   dsns[buddy])
    states = wait_sync({region: {"mode": mode}}, dsns)
    return states[0].sync_state


# --------------------------------------------------------------------------- rounds


@dataclass
class Measurement:
    """One mode in one round."""

    mode: str
    round: int
    payments: int
    errors: int
    error_kinds: dict[str, int]
    seconds: float
    payments_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    sql_commits: int
    sql_p50_ms: float
    sql_p95_ms: float
    sql_p99_ms: float
    sql_commits_per_s: float
    sync_state_after: str | None


METRICS = ("payments_per_s", "p50_ms", "p95_ms", "p99_ms", "errors", "sql_p50_ms",
           "sql_p95_ms", "sql_p99_ms", "sql_commits_per_s")


def medians(rows: list[Measurement], mode: str) -> dict[str, float]:
    """Median of each metric over the rounds of `mode`."""
    mine = [r for r in rows if r.mode == mode]
    return {m: round(statistics.median(float(getattr(r, m)) for r in mine), 2)
            for m in METRICS}


def ratios(local: dict[str, float], regional: dict[str, float]) -> dict[str, float | None]:
    """regional / local for every metric but the error count."""
    return {m: (round(regional[m] / local[m], 3) if local[m] else None)
            for m in METRICS if m != "errors"}


async def _rounds(args: SimpleNamespace, cluster: Cluster) -> list[Measurement]:
    region = cluster.region(args.region)
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=region.api_url, timeout=60.0, limits=limits,
                                 headers=api_headers(cluster)) as client:
        with console.status(f"opening {args.concurrency} payer/payee pairs in "
                            f"{args.region} ..."):
            pairs = await create_pairs(client, args.concurrency, home_region=args.region)
            await asyncio.to_thread(create_scratch, cluster, args.region)
        await asyncio.to_thread(switch, cluster, args.region, args.buddy, "local")
        if args.warmup > 0:
            with console.status(f"warming up for {args.warmup:g}s ..."):
                await drive_payments(client, pairs, args.concurrency, args.amount,
                                     args.warmup, None)
                await asyncio.to_thread(sql_commits, region.dsn, 5)
        rows: list[Measurement] = []
        for n in range(1, args.rounds + 1):
            for mode in (MODES if n % 2 else tuple(reversed(MODES))):
                await asyncio.to_thread(switch, cluster, args.region, args.buddy, mode)
                with console.status(f"round {n}/{args.rounds}, {mode}: payments "
                                    f"({args.duration:g}s, {args.concurrency} clients) ..."):
                    run = await drive_payments(client, pairs, args.concurrency, args.amount,
                                               args.duration, None)
                with console.status(f"round {n}/{args.rounds}, {mode}: {args.sql_commits} "
                                    "SQL commits ..."):
                    t0 = time.perf_counter()
                    commits = await asyncio.to_thread(sql_commits, region.dsn,
                                                      args.sql_commits)
                    sql_seconds = time.perf_counter() - t0
                state = await asyncio.to_thread(durability, region.dsn, args.region,
                                                cluster.names)
                if state.mode != mode:
                    raise BenchError(f"{args.region} left {mode} mode during the round")
                lat = run.latencies_ms
                row = Measurement(
                    mode, n, run.ok, run.errors, dict(run.error_kinds), round(run.seconds, 3),
                    round(run.per_second, 1), round(percentile(lat, 50), 2),
                    round(percentile(lat, 95), 2), round(percentile(lat, 99), 2),
                    len(commits), round(percentile(commits, 50), 2),
                    round(percentile(commits, 95), 2), round(percentile(commits, 99), 2),
                    round(len(commits) / sql_seconds, 1), state.sync_state)
                rows.append(row)
                console.print(f"round {n} {mode:>8}: {row.payments_per_s:.1f} payments/s, "
                              f"p50 {row.p50_ms:.1f} ms, p99 {row.p99_ms:.1f} ms, "
                              f"{row.errors} errors; SQL commit p50 {row.sql_p50_ms:.2f} ms"
                              + (f" (buddy {state.sync_state})" if mode == "regional" else ""))
        return rows


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def print_table(args: SimpleNamespace, rtt_ms: float, rows: list[Measurement],
                summary: dict[str, Any]) -> None:
    """Rich table: a row per mode and round, the medians, and regional / local."""
    table = Table(title=f"commit cost of regional vs local durability: {args.region}, buddy "
                        f"{args.buddy} ({rtt_ms:.0f} ms round trip at WAN scale "
                        f"{args.wan_scale:g}); {args.concurrency} clients x "
                        f"{args.duration:g} s, {args.sql_commits} SQL commits, "
                        f"{args.rounds} round(s)",
                  caption="payments: HTTP, C clients; SQL: one-row insert commits, one "
                          "connection, sequential; medians over the rounds")
    for col in ("mode", "round", "payments/s", "p50 ms", "p95 ms", "p99 ms", "errors",
                "SQL p50 ms", "SQL p95 ms", "SQL p99 ms", "SQL commits/s"):
        table.add_column(col, justify="right" if col not in ("mode",) else "left")
    for r in rows:
        table.add_row(r.mode, str(r.round), _fmt(r.payments_per_s), _fmt(r.p50_ms),
                      _fmt(r.p95_ms), _fmt(r.p99_ms), str(r.errors), _fmt(r.sql_p50_ms, 2),
                      _fmt(r.sql_p95_ms, 2), _fmt(r.sql_p99_ms, 2), _fmt(r.sql_commits_per_s))
    for mode in MODES:
        m = summary["median"][mode]
        table.add_row(mode, "median", _fmt(m["payments_per_s"]), _fmt(m["p50_ms"]),
                      _fmt(m["p95_ms"]), _fmt(m["p99_ms"]), _fmt(m["errors"], 0),
                      _fmt(m["sql_p50_ms"], 2), _fmt(m["sql_p95_ms"], 2),
                      _fmt(m["sql_p99_ms"], 2), _fmt(m["sql_commits_per_s"]), style="bold")
    q = summary["regional_over_local"]
    table.add_row("regional/local", "", *(f"{v:.2f}x" if v is not None else "-" for v in (
        q["payments_per_s"], q["p50_ms"], q["p95_ms"], q["p99_ms"])), "",
        *(f"{v:.2f}x" if v is not None else "-" for v in (
            q["sql_p50_ms"], q["sql_p95_ms"], q["sql_p99_ms"], q["sql_commits_per_s"])),
        style="bold")
    console.print(table)
    added = summary["added_ms"]
    console.print(f"regional adds {added['p50_ms']:.1f} ms to a payment (p50) and "
                  f"{added['sql_p50_ms']:.1f} ms to a bare SQL commit (p50); the buddy round "
                  f"trip is {rtt_ms:.0f} ms")


def summarize(rows: list[Measurement], rtt_ms: float) -> dict[str, Any]:
    """Medians per mode, regional/local ratios, and what regional adds (ms, p50/p99)."""
    median = {mode: medians(rows, mode) for mode in MODES}
    local, regional = median["local"], median["regional"]
    return {"median": median, "regional_over_local": ratios(local, regional),
            "added_ms": {m: round(regional[m] - local[m], 2)
                         for m in ("p50_ms", "p99_ms", "sql_p50_ms", "sql_p99_ms")},
            "buddy_rtt_ms": rtt_ms}


def write_json(path: Path, args: SimpleNamespace, rtt_ms: float, rows: list[Measurement],
               summary: dict[str, Any]) -> None:
    """The configuration, environment, every measurement and the summary."""
    doc = {
        "benchmark": "durability",
        "finished_at": datetime.now(UTC).isoformat(),
        "config": {"regions": args.regions, "wan_scale": args.wan_scale,
                   "region": args.region, "buddy": args.buddy, "buddy_rtt_ms": rtt_ms,
                   "concurrency": args.concurrency, "duration_s": args.duration,
                   "rounds": args.rounds, "sql_commits": args.sql_commits,
                   "warmup_s": args.warmup, "amount": args.amount},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "rounds": [asdict(r) for r in rows],
        **summary,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


# --------------------------------------------------------------------------- main


def run(args: SimpleNamespace) -> int:
    """Start the lab, measure, print and write; the lab is stopped in every case."""
    temp = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="paycluster-bench-dur-")) if temp else args.data_dir
    rtt_ms = link_rtt(args.region, args.buddy, args.wan_scale) * 1000
    with console.status(f"starting {args.regions} regions at WAN scale {args.wan_scale:g} ..."):
        cluster = start_cluster(data_dir, regions=args.regions, wan_scale=args.wan_scale)
    code = 1
    try:
        rows = asyncio.run(_rounds(args, cluster))
        summary = summarize(rows, rtt_ms)
        print_table(args, rtt_ms, rows, summary)
        write_json(args.json_out, args, rtt_ms, rows, summary)
        console.print(f"results: {args.json_out}")
        code = 0 if all(r.payments > 0 and r.errors == 0 for r in rows) else 1
        return code
    finally:
        stop_lab(cluster, console, "lab", data_dir if temp else None, keep=code != 0)


def main(args: SimpleNamespace) -> int:
    """Run the benchmark; returns the process exit code."""
    return guarded(lambda: run(args), console)


if __name__ == "__main__":
    app(prog_name="python -m bench.durability")
