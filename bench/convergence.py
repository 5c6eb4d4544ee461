"""Benchmark: a cross-region payment, from its acknowledgement to `succeeded` in both regions.

Starts a two-region lab (us-east, eu-west: 75 ms round trip at WAN scale 1) and pays from
payers homed in us-east to payees homed in eu-west, C clients at a time, over HTTP at
us-east with an Idempotency-Key each. A payment is acknowledged `processing` (201); the
saga then credits the payee in eu-west and ends the payment `succeeded` in us-east, and
that row replicates to eu-west. For each payment this measures, from the 201:

- `payer region`: until us-east's row says `succeeded`;
- `both regions`: until eu-west's copy of the row says `succeeded` too (the figure of
  issue 13's P4: p99 at most 1 s at WAN scale 1; the floor is about one and a half round
  trips of the pair).

Both stores are polled directly (psycopg, every `--poll-ms`), so the measurement adds no
load to the nodes.

    python -m bench.convergence [--wan-scale 1.0] [-c 4] [-n 200] [--poll-ms 5]

Prints a table and writes JSON (default bench/results/convergence.json).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import httpx
import psycopg
import typer
from rich.console import Console
from rich.table import Table

from bench.runner import bench_app, guarded
from bench.stats import stop_lab
from cluster.lab import Cluster, start_cluster
from cluster.stats import percentile

PAYER_REGION, PAYEE_REGION = "us-east", "eu-west"
DEFAULT_JSON_OUT = Path(__file__).resolve().parent / "results" / "convergence.json"
console = Console()


@dataclass
class Samples:
    """Milliseconds from each acknowledgement to `succeeded` in the payer's region and in
    both; errors by kind."""

    ack_ms: list[float] = field(default_factory=list)
    payer_ms: list[float] = field(default_factory=list)
    both_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


async def _status(conn: psycopg.AsyncConnection[Any], payment_id: str) -> str | None:
    row = await (await conn.execute("select status from payments where id = %s",
                                    (payment_id,))).fetchone()
    return None if row is None else str(row[0])


async def _accounts(clients: dict[str, httpx.AsyncClient], n: int) -> list[tuple[str, str]]:
    pairs = []
    for _ in range(n):
        payer = (await clients[PAYER_REGION].post("/v1/accounts", json={
            "currency": "USD"})).json()["id"]
        dep = await clients[PAYER_REGION].post(f"/v1/accounts/{payer}/deposits",
                                               json={"amount": 10**9})
        dep.raise_for_status()
        payee = (await clients[PAYEE_REGION].post("/v1/accounts", json={
            "currency": "USD", "kind": "merchant"})).json()["id"]
        pairs.append((payer, payee))
    # The payee must be known in the payer's region (replicated) for nothing but speed:
    # the saga works either way. Wait a little so the first payments are not special.
    await asyncio.sleep(2.0)
    return pairs


async def _client(http: httpx.AsyncClient, dsns: dict[str, str], pair: tuple[str, str],
                  count: int, poll: float, out: Samples) -> None:
    async with await psycopg.AsyncConnection.connect(dsns[PAYER_REGION],
                                                     autocommit=True) as home, \
            await psycopg.AsyncConnection.connect(dsns[PAYEE_REGION], autocommit=True) as far:
        for _ in range(count):
            t0 = time.perf_counter()
            resp = await http.post("/v1/payments", json={
                "payer": pair[0], "payee": pair[1], "amount": 100, "currency": "USD"},
                headers={"Idempotency-Key": f"conv-{uuid.uuid4()}"})
            acked = time.perf_counter()
            if resp.status_code != 201:
                kind = f"HTTP {resp.status_code}"
                out.errors[kind] = out.errors.get(kind, 0) + 1
                continue
            pid = resp.json()["id"]
            payer_done: float | None = None
            deadline = acked + 30
            while time.perf_counter() < deadline:
                if payer_done is None and await _status(home, pid) == "succeeded":
                    payer_done = time.perf_counter()
                if payer_done is not None and await _status(far, pid) == "succeeded":
                    both = time.perf_counter()
                    out.ack_ms.append((acked - t0) * 1000)
                    out.payer_ms.append((payer_done - acked) * 1000)
                    out.both_ms.append((both - acked) * 1000)
                    break
                await asyncio.sleep(poll)
            else:
                out.errors["not converged in 30 s"] = out.errors.get(
                    "not converged in 30 s", 0) + 1


async def _bench(cluster: Cluster, concurrency: int, payments: int, poll: float) -> Samples:
    clients = {r: httpx.AsyncClient(base_url=cluster.region(r).api_url, timeout=60,
                                    headers=cluster.auth_headers())
               for r in (PAYER_REGION, PAYEE_REGION)}
    dsns = {r: cluster.region(r).servers.postgres.dsn("paycluster")
            for r in (PAYER_REGION, PAYEE_REGION)}
    try:
        pairs = await _accounts(clients, concurrency)
        out = Samples()
        per_client = max(1, payments // concurrency)
        await asyncio.gather(*(_client(clients[PAYER_REGION], dsns, pair, per_client, poll,
                                       out) for pair in pairs))
        return out
    finally:
        for client in clients.values():
            await client.aclose()


app = bench_app()


@app.command(help="Cross-region convergence: how long after a payment in us-east its credit "
                  "is visible in eu-west.")
def cli(wan_scale: Annotated[float, typer.Option(min=0.0, help="WAN round-trip scale")] = 1.0,
        concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1,
                                                 help="clients in flight")] = 4,
        payments: Annotated[int, typer.Option("--payments", "-n", min=1,
                                              help="payments in total")] = 200,
        poll_ms: Annotated[float, typer.Option(min=0.1, help="poll interval at the payee's "
                                                             "region")] = 5.0,
        json_out: Annotated[Path, typer.Option(help="result file")] = DEFAULT_JSON_OUT,
        ) -> None:
    """The benchmark's options; exits with its exit code."""
    args = SimpleNamespace(wan_scale=wan_scale, concurrency=concurrency, payments=payments,
                           poll_ms=poll_ms, json_out=json_out)
    raise typer.Exit(guarded(lambda: main(args), console))


def main(args: SimpleNamespace) -> int:
    """Run the benchmark; print the table and write the JSON."""
    data_dir = Path(tempfile.mkdtemp(prefix="paycluster-bench-convergence-"))
    with console.status(f"starting {PAYER_REGION} and {PAYEE_REGION} at WAN scale "
                        f"{args.wan_scale} ..."):
        cluster = start_cluster(data_dir, regions=2, wan_scale=args.wan_scale)
    code = 1
    try:
        out = asyncio.run(_bench(cluster, args.concurrency, args.payments,
                                 args.poll_ms / 1000))
        code = 0 if out.both_ms else 1
    finally:
        stop_lab(cluster, console, "lab", data_dir, keep=code != 0)
    table = Table(title=f"cross-region payment {PAYER_REGION} -> {PAYEE_REGION}, WAN scale "
                        f"{args.wan_scale}, {args.concurrency} clients")
    for col in ("from the 201 until", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    figures: dict[str, Any] = {}
    for name, values in (("ack (request to 201)", out.ack_ms),
                         ("succeeded in the payer's region", out.payer_ms),
                         ("succeeded in both regions", out.both_ms)):
        values = sorted(values)
        row = {p: round(percentile(values, p), 1) for p in (50, 90, 99, 100)}
        figures[name] = {"n": len(values), **{f"p{p}": v for p, v in row.items()}}
        table.add_row(name, str(len(values)), *(f"{row[p]:,.1f}" for p in (50, 90, 99, 100)))
    console.print(table)
    if out.errors:
        console.print(f"errors: {out.errors}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({
        "benchmark": "convergence", "wan_scale": args.wan_scale,
        "concurrency": args.concurrency, "payments": args.payments,
        "poll_ms": args.poll_ms, "figures": figures, "errors": out.errors}, indent=2) + "\n")
    console.print(f"results: {args.json_out}")
    return code


if __name__ == "__main__":
    app(prog_name="python -m bench.convergence")
