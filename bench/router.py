"""Geo router overhead: requests/s and latency through the router vs straight to the node.

Both paths hit the same region node in the same run, interleaved (round 1: direct then
router; round 2: router then direct; ...), so the difference is the router's: one more
HTTP hop on loopback, the routing decision, header rewriting and body relaying.

Workloads (each from C concurrent clients for a fixed time):
- `live`: `GET /health/live`, the node's cheapest answer - the router's overhead bare;
- `account`: `GET /v1/accounts/{id}`, a read from PostgreSQL;
- `payment`: `POST /v1/payments` with an Idempotency-Key (the router also peeks at the
  body to find the payer's owning region).

    python -m bench.router                                  # starts its own region + router
    python -m bench.router --concurrency 1,16 --duration 5 --rounds 3
    python -m bench.router --api-url http://127.0.0.1:8000 --router-url http://127.0.0.1:8080
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
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from bench.runner import ApiKey, BenchError, bench_app, guarded, usage
from bench.stats import TimedRun, stop_lab
from cluster.console import make_console
from cluster.lab import start_cluster
from cluster.stats import percentile

DEFAULT_JSON_OUT = Path(__file__).resolve().parent / "results" / "router.json"
WORKLOADS = ("live", "account", "payment")
PATHS = ("direct", "router")
CURRENCY = "USD"
PAYER_FUNDING = 1_000_000_000

console = make_console()


app = bench_app()


@app.command(help="Geo router overhead: requests/s and added p50/p99 latency through the "
                  "router vs straight to the region node, in the same run.")
def cli(
        api_url: Annotated[str | None, typer.Option(
            help="a running region node's REST API (default: start one region and one "
                 "router)", rich_help_panel="target")] = None,
        api_key: ApiKey = None,
        router_url: Annotated[str | None, typer.Option(
            help="a running router in front of that node", rich_help_panel="target")] = None,
        data_dir: Annotated[Path | None, typer.Option(
            "--data-dir", "-d", help="where a self-started lab lives (default: a temp dir)",
            rich_help_panel="target")] = None,
        workloads: Annotated[str, typer.Option(
            help=f"comma-separated, from {', '.join(WORKLOADS)}",
            rich_help_panel="load")] = ",".join(WORKLOADS),
        concurrency: Annotated[str, typer.Option(
            "--concurrency", "-c", help="comma-separated client counts",
            rich_help_panel="load")] = "1,16",
        duration: Annotated[float, typer.Option(
            "--duration", "-T", min=0.001, help="seconds per measurement",
            rich_help_panel="load")] = 3.0,
        rounds: Annotated[int, typer.Option(
            min=1, help="rounds; each measures both paths, in alternating order",
            rich_help_panel="load")] = 2,
        warmup: Annotated[float, typer.Option(
            min=0.0, help="seconds of unrecorded load per path before round 1",
            rich_help_panel="load")] = 1.0,
        json_out: Annotated[Path, typer.Option(help="result file")] = DEFAULT_JSON_OUT,
) -> None:
    """The benchmark's options (also `paycluster router bench`); exits with its exit code."""
    names = [w.strip() for w in workloads.split(",") if w.strip()]
    unknown = set(names) - set(WORKLOADS)
    if unknown or not names:
        raise usage(f"--workloads: unknown {', '.join(sorted(unknown)) or '(none given)'}")
    try:
        counts = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise usage("--concurrency must be comma-separated integers") from None
    if not counts or min(counts) < 1:
        raise usage("--concurrency values must be at least 1")
    if bool(api_url) != bool(router_url):
        raise usage("give both --api-url and --router-url, or neither")
    args = SimpleNamespace(api_url=api_url, api_key=api_key, router_url=router_url,
                           data_dir=data_dir, workloads=names, concurrency=counts,
                           duration=duration, rounds=rounds, warmup=warmup, json_out=json_out)
    raise typer.Exit(main(args))


# --------------------------------------------------------------------------- load


Call = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def drive(client: httpx.AsyncClient, call: Call, expect: int, concurrency: int,
                duration: float) -> TimedRun:
    """`concurrency` clients calling `call` back to back for `duration` seconds."""
    run = TimedRun()
    deadline = time.perf_counter() + duration

    async def loop(i: int) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                resp = await call(client, i)
            except httpx.HTTPError as exc:
                run.errors += 1
                run.error_kinds[type(exc).__name__] += 1
                continue
            if resp.status_code == expect:
                run.ok += 1
                run.latencies_ms.append((time.perf_counter() - t0) * 1000)
            else:
                run.errors += 1
                run.error_kinds[f"HTTP {resp.status_code}"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    run.seconds = time.perf_counter() - started
    return run


async def _setup(client: httpx.AsyncClient, pairs: int) -> tuple[str, list[tuple[str, str]]]:
    async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = await client.post(path, json=body,
                                 headers={"Idempotency-Key": f"bench-{uuid.uuid4()}"})
        if resp.status_code != 201:
            raise BenchError(f"POST {path} -> {resp.status_code}: {resp.text[:300]}")
        doc: dict[str, Any] = resp.json()
        return doc

    async def pair() -> tuple[str, str]:
        payer = await post("/v1/accounts", {"currency": CURRENCY, "kind": "customer"})
        payee = await post("/v1/accounts", {"currency": CURRENCY, "kind": "merchant"})
        await post(f"/v1/accounts/{payer['id']}/deposits", {"amount": PAYER_FUNDING})
        return payer["id"], payee["id"]

    made = [await pair() for _ in range(pairs)]
    return made[0][0], made


def workload(name: str, account: str, pairs: list[tuple[str, str]]) -> tuple[Call, int]:
    """The request of a workload and the status it must answer."""
    if name == "live":
        return (lambda c, i: c.get("/health/live")), 200
    if name == "account":
        return (lambda c, i: c.get(f"/v1/accounts/{account}")), 200

    def pay(c: httpx.AsyncClient, i: int) -> Awaitable[httpx.Response]:
        # Each client its own pair: the number measures the path, not row contention.
        payer, payee = pairs[i % len(pairs)]
        return c.post("/v1/payments", json={"payer": payer, "payee": payee, "amount": 1,
                                            "currency": CURRENCY},
                      headers={"Idempotency-Key": f"bench-{uuid.uuid4()}"})
    return pay, 201


# --------------------------------------------------------------------------- rounds


@dataclass
class Result:
    """Both paths of one workload at one concurrency, over all rounds."""

    workload: str
    concurrency: int
    direct_rps: float
    router_rps: float
    rps_ratio: float
    direct_p50_ms: float
    router_p50_ms: float
    added_p50_ms: float
    direct_p99_ms: float
    router_p99_ms: float
    added_p99_ms: float
    requests: dict[str, int]
    errors: dict[str, int]
    error_kinds: dict[str, dict[str, int]]
    rounds_rps: dict[str, list[float]]


def summarize(name: str, concurrency: int, runs: dict[str, list[TimedRun]]) -> Result:
    """Medians of requests/s over the rounds; percentiles over every request of a path."""
    rps = {p: statistics.median(r.per_second for r in runs[p]) for p in PATHS}
    lat = {p: sorted(x for r in runs[p] for x in r.latencies_ms) for p in PATHS}
    p50 = {p: percentile(lat[p], 50) for p in PATHS}
    p99 = {p: percentile(lat[p], 99) for p in PATHS}
    return Result(
        name, concurrency, round(rps["direct"], 1), round(rps["router"], 1),
        round(rps["router"] / rps["direct"], 3) if rps["direct"] else math.nan,
        round(p50["direct"], 3), round(p50["router"], 3), round(p50["router"] - p50["direct"], 3),
        round(p99["direct"], 3), round(p99["router"], 3), round(p99["router"] - p99["direct"], 3),
        {p: sum(r.ok for r in runs[p]) for p in PATHS},
        {p: sum(r.errors for r in runs[p]) for p in PATHS},
        {p: dict(sum((r.error_kinds for r in runs[p]), Counter())) for p in PATHS},
        {p: [round(r.per_second, 1) for r in runs[p]] for p in PATHS})


async def _bench(args: SimpleNamespace, api_url: str, router_url: str) -> list[Result]:
    top = max(args.concurrency)
    limits = httpx.Limits(max_connections=top, max_keepalive_connections=top)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    async with httpx.AsyncClient(base_url=api_url, timeout=30.0, limits=limits,
                                 trust_env=False, headers=headers) as direct, \
            httpx.AsyncClient(base_url=router_url, timeout=30.0, limits=limits,
                              trust_env=False, headers=headers) as routed:
        clients = {"direct": direct, "router": routed}
        with console.status("creating accounts ..."):
            account, pairs = await _setup(direct, top if "payment" in args.workloads else 1)
        results = []
        for name in args.workloads:
            call, expect = workload(name, account, pairs)
            if args.warmup:
                for path in PATHS:
                    await drive(clients[path], call, expect, top, args.warmup)
            for concurrency in args.concurrency:
                runs: dict[str, list[TimedRun]] = {p: [] for p in PATHS}
                for n in range(args.rounds):
                    # Alternate the order, so a drift in the machine's state hits both paths.
                    for path in PATHS if n % 2 == 0 else tuple(reversed(PATHS)):
                        with console.status(f"{name}, {concurrency} client(s), round "
                                            f"{n + 1}/{args.rounds}: {path} ..."):
                            runs[path].append(await drive(clients[path], call, expect,
                                                          concurrency, args.duration))
                result = summarize(name, concurrency, runs)
                if not result.requests["direct"] or not result.requests["router"]:
                    raise BenchError(f"{name}: no successful requests "
                                     f"(errors: {result.error_kinds})")
                console.print(f"{name:8} c={concurrency:<3} direct {result.direct_rps:8.0f}/s "
                              f"router {result.router_rps:8.0f}/s; added p50 "
                              f"{result.added_p50_ms:.2f} ms, p99 {result.added_p99_ms:.2f} ms")
                results.append(result)
        return results


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def print_table(results: list[Result]) -> None:
    """Rich table: one row per workload and client count."""
    table = Table(title="geo router overhead: through the router vs straight to the node "
                        "(same run)",
                  caption="req/s: median over rounds; ratio = router req/s / direct req/s; "
                          "p50/p99 over every request; added = router - direct")
    for col in ("workload", "clients", "direct req/s", "router req/s", "ratio",
                "direct p50 ms", "router p50 ms", "added p50 ms", "direct p99 ms",
                "router p99 ms", "added p99 ms", "errors"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for r in results:
        table.add_row(r.workload, str(r.concurrency), _fmt(r.direct_rps, 0),
                      _fmt(r.router_rps, 0), _fmt(r.rps_ratio, 2), _fmt(r.direct_p50_ms),
                      _fmt(r.router_p50_ms), _fmt(r.added_p50_ms), _fmt(r.direct_p99_ms),
                      _fmt(r.router_p99_ms), _fmt(r.added_p99_ms),
                      str(r.errors["direct"] + r.errors["router"]))
    console.print(table)


def _write_json(path: Path, args: SimpleNamespace, api_url: str, router_url: str,
                self_started: bool, results: list[Result]) -> None:
    doc = {
        "benchmark": "router",
        "finished_at": datetime.now(UTC).isoformat(),
        "config": {"api_url": api_url, "router_url": router_url, "self_started": self_started,
                   "workloads": args.workloads, "concurrency": args.concurrency,
                   "duration_s": args.duration, "rounds": args.rounds,
                   "warmup_s": args.warmup},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count(),
                        "note": "load generator, router and node share these CPUs"},
        "results": [asdict(r) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _run(args: SimpleNamespace, api_url: str, router_url: str, self_started: bool) -> int:
    try:
        import uvloop

        results = uvloop.run(_bench(args, api_url, router_url))
    except ImportError:
        results = asyncio.run(_bench(args, api_url, router_url))
    print_table(results)
    _write_json(args.json_out, args, api_url, router_url, self_started, results)
    console.print(f"results: {args.json_out}")
    return 0


def main(args: SimpleNamespace) -> int:
    """Run the benchmark; returns the process exit code."""
    def measure() -> int:
        if args.api_url:
            return _run(args, args.api_url.rstrip("/"), args.router_url.rstrip("/"),
                        self_started=False)
        return _self_started(args)

    return guarded(measure, console)


def _self_started(args: SimpleNamespace) -> int:
    temp = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="paycluster-bench-router-")) if temp \
        else args.data_dir
    with console.status("starting one region and a geo router ..."):
        cluster = start_cluster(data_dir, regions=1, detach=False, routers=1)
    code = 1
    try:
        region = cluster.regions[0]
        args.api_key = cluster.admin_key
        console.print(f"region {region.name} at {region.api_url}; router at "
                      f"{cluster.router_url}")
        code = _run(args, region.api_url, cluster.router_url, self_started=True)
        return code
    finally:
        stop_lab(cluster, console, "lab", data_dir if temp else None, keep=code != 0)


if __name__ == "__main__":
    app(prog_name="python -m bench.router")
