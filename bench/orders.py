"""Benchmark: orders/s and latency of global stock in escrow mode versus strict mode.

Starts a three-region lab at the chosen WAN scale (default 1.0: real inter-region round
trips), then, in the same run and against the same cluster, places orders for a SKU in
escrow mode (each region sells from its own allotment) and for one in strict mode (every
reservation takes the SKU's quorum lock across the regions' Redis servers and takes its
units from the SKU's home region). Buyers in all three regions order at once.

    python -m bench.orders [--wan-scale 1.0] [--concurrency 12] [--duration 15]

Prints a table and writes JSON (default bench/results/orders.json) with the ratio.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from bench.runner import bench_app, guarded
from cluster.lab import Cluster, start_cluster
from cluster.stats import percentile
from cluster.wan import REGIONS


async def _setup(clients: dict[str, httpx.AsyncClient]) -> dict[str, tuple[list[str], str]]:
    parties: dict[str, tuple[list[str], str]] = {}
    for region, client in clients.items():
        merchant = (await client.post("/v1/accounts", json={
            "currency": "USD", "kind": "merchant"})).json()["id"]
        buyers = []
        for _ in range(6):
            buyer = (await client.post("/v1/accounts", json={"currency": "USD"})).json()["id"]
            await client.post(f"/v1/accounts/{buyer}/deposits", json={"amount": 10**9})
            buyers.append(buyer)
        parties[region] = (buyers, merchant)
    return parties


async def _run_mode(clients: dict[str, httpx.AsyncClient],
                    parties: dict[str, tuple[list[str], str]], mode: str, concurrency: int,
                    duration: float) -> dict[str, Any]:
    sku = f"bench-{mode}-{uuid.uuid4().hex[:6]}"
    created = await clients["us-east"].post("/v1/skus", json={
        "sku": sku, "stock": 10**8, "mode": mode})
    created.raise_for_status()
    deadline = time.monotonic() + 30
    while True:  # the SKU must have replicated to every region before orders start
        codes = [(await c.get(f"/v1/skus/{sku}")).status_code for c in clients.values()]
        if all(code == 200 for code in codes) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + duration

    async def worker(n: int) -> None:
        nonlocal errors
        region = REGIONS[n % len(REGIONS)]
        buyers, merchant = parties[region]
        i = 0
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                resp = await clients[region].post("/v1/orders", json={
                    "sku": sku, "quantity": 1, "payer": buyers[(n + i) % len(buyers)],
                    "payee": merchant, "amount": 100, "currency": "USD"})
                ok = resp.status_code == 201
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.monotonic() - started)
            else:
                errors += 1
            i += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    elapsed = time.monotonic() - started
    return {"mode": mode, "orders": len(latencies), "errors": errors,
            "orders_per_s": len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
            "p95_ms": percentile(sorted(latencies), 95) * 1000,
            "p99_ms": percentile(sorted(latencies), 99) * 1000}


async def _bench(cluster: Cluster, concurrency: int, duration: float) -> list[dict[str, Any]]:
    clients = {r: httpx.AsyncClient(base_url=cluster.region(r).api_url, timeout=60,
                                    headers=cluster.auth_headers())
               for r in REGIONS}
    try:
        parties = await _setup(clients)
        return [await _run_mode(clients, parties, mode, concurrency, duration)
                for mode in ("escrow", "strict")]
    finally:
        for client in clients.values():
            await client.aclose()


app = bench_app()


@app.command(help="Orders: escrow vs strict stock reservations across three regions.")
def cli(wan_scale: Annotated[float, typer.Option(min=0.0, help="WAN round-trip scale")] = 1.0,
        concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1,
                                                 help="clients in flight")] = 12,
        duration: Annotated[float, typer.Option("--duration", "-T", min=0.1,
                                                help="seconds per mode")] = 15.0,
        json_out: Annotated[Path, typer.Option(help="result file")]
        = Path("bench/results/orders.json"),
        ) -> None:
    """The benchmark's options; exits with its exit code."""
    args = SimpleNamespace(wan_scale=wan_scale, concurrency=concurrency, duration=duration,
                           json_out=json_out)
    raise typer.Exit(guarded(lambda: main(args), Console()))


def main(args: SimpleNamespace) -> int:
    """Run the benchmark; print the table and write the JSON."""
    console = Console()
    with tempfile.TemporaryDirectory(prefix="paycluster-bench-orders-") as tmp:
        console.print(f"starting 3 regions at WAN scale {args.wan_scale} ...")
        cluster = start_cluster(Path(tmp), regions=3, wan_scale=args.wan_scale)
        try:
            rows = asyncio.run(_bench(cluster, args.concurrency, args.duration))
        finally:
            cluster.stop()
    table = Table(title=f"orders: escrow vs strict (3 regions, WAN scale {args.wan_scale}, "
                        f"{args.concurrency} clients, {args.duration:.0f} s each)")
    for col in ("mode", "orders/s", "p50 ms", "p95 ms", "p99 ms", "errors"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["mode"], f"{r['orders_per_s']:.1f}", f"{r['p50_ms'] or 0:.0f}",
                      f"{r['p95_ms']:.0f}", f"{r['p99_ms']:.0f}", str(r["errors"]))
    console.print(table)
    escrow, strict = rows
    ratio = escrow["orders_per_s"] / strict["orders_per_s"] if strict["orders_per_s"] else None
    console.print(f"escrow / strict throughput: {ratio:.1f}x" if ratio else "strict: no orders")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({
        "wan_scale": args.wan_scale, "concurrency": args.concurrency,
        "duration_s": args.duration, "results": rows, "escrow_over_strict": ratio}, indent=2))
    console.print(f"results: {args.json_out}")
    return 0


if __name__ == "__main__":
    app(prog_name="python -m bench.orders")
