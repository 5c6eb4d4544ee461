"""Lock latencies over the emulated WAN: `python -m bench.locks [--wan-scale 1.0]`.

Starts three real Redis servers (one per lab region) and, for a client in each region, WAN
links to the other two regions' servers with the lab's default round-trip times times
`--wan-scale`. Measures, per client region, uncontended acquire / renew / release, and then
several tasks per region contending for the same lock through `hold()` (hand-overs per
second and wait to enter under contention). Prints one JSON document.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from bench.runner import bench_app
from cluster.stats import percentile
from lock_service.config import LockSettings
from lock_service.quorum import LockService


def _ms(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50_ms": round(percentile(samples, 50) * 1000, 2),
            "p99_ms": round(percentile(samples, 99) * 1000, 2),
            "mean_ms": round(statistics.fmean(samples) * 1000, 2)}


async def run(scale: float, rounds: int, contention_seconds: float,
              tasks: int = 1) -> dict[str, Any]:
    """Start the servers and links, measure, stop everything; returns the report."""
    from cluster.servers import start_redis
    from cluster.wan import REGIONS, Link, default_rtt_seconds

    report: dict[str, Any] = {"scale": scale, "regions": list(REGIONS), "by_client_region": {}}
    with tempfile.TemporaryDirectory(prefix="lockbench-") as tmp:
        servers = [start_redis(Path(tmp) / region) for region in REGIONS]
        links: list[Link] = []
        try:
            urls: dict[str, list[str]] = {}
            for src in REGIONS:
                urls[src] = []
                for dst, server in zip(REGIONS, servers, strict=True):
                    if src == dst:
                        urls[src].append(server.url)
                        continue
                    link = Link(src, dst, "redis", "127.0.0.1", server.port,
                                rtt_seconds=default_rtt_seconds(src, dst, scale))
                    await link.start()
                    links.append(link)
                    urls[src].append(f"redis://127.0.0.1:{link.listen_port}/0")
            settings = LockSettings(ttl_seconds=5.0, op_timeout_seconds=2.0)
            services = {r: LockService(urls[r], settings) for r in REGIONS}
            await services[REGIONS[0]].provision_new_servers()
            for region, svc in services.items():
                acquire, renew, release = [], [], []
                for i in range(rounds):
                    t0 = time.perf_counter()
                    lease = await svc.acquire(f"bench:{region}:{i % 4}")
                    t1 = time.perf_counter()
                    if not await svc.renew(lease):
                        raise RuntimeError("renewal failed on a healthy cluster")
                    t2 = time.perf_counter()
                    await svc.release(lease)
                    t3 = time.perf_counter()
                    acquire.append(t1 - t0)
                    renew.append(t2 - t1)
                    release.append(t3 - t2)
                report["by_client_region"][region] = {
                    "acquire": _ms(acquire), "renew": _ms(renew), "release": _ms(release)}
            report["contended"] = await _contend(services, contention_seconds, tasks)
            for svc in services.values():
                await svc.aclose()
        finally:
            for link in links:
                with contextlib.suppress(Exception):
                    await link.close()
            for server in servers:
                server.stop()
    return report


async def _contend(services: dict[str, LockService], seconds: float,
                   tasks: int) -> dict[str, Any]:
    """`tasks` tasks per region take the same lock with `hold()` over and over."""
    name = "bench:contended"
    waits: list[float] = []
    holds = dict.fromkeys(services, 0)
    stop_at = time.monotonic() + seconds

    async def client(region: str, svc: LockService) -> None:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            async with svc.hold(name, wait=30):
                waits.append(time.perf_counter() - t0)
                holds[region] += 1

    start = time.monotonic()
    await asyncio.gather(*(client(r, s) for r, s in services.items() for _ in range(tasks)))
    elapsed = time.monotonic() - start
    return {"seconds": round(elapsed, 2), "tasks_per_region": tasks,
            "handovers_per_s": round(sum(holds.values()) / elapsed, 1),
            "holds_by_region": holds, "acquire": _ms(waits)}


app = bench_app()


@app.command(help="Lock latencies over the emulated WAN: three Redis servers, a client in "
                  "each region; prints one JSON document.")
def main(wan_scale: Annotated[float, typer.Option(
             "--wan-scale", "--scale", min=0.0, help="WAN round-trip scale")] = 1.0,
         rounds: Annotated[int, typer.Option(min=1, help="samples per client region")] = 40,
         contention_seconds: Annotated[float, typer.Option(
             min=0.1, help="seconds of contended hand-overs")] = 5.0,
         tasks_per_region: Annotated[int, typer.Option(
             min=1, help="contending tasks per region (they queue locally in hold())")] = 4,
         ) -> None:
    """Measure and print the report."""
    report = asyncio.run(run(wan_scale, rounds, contention_seconds, tasks_per_region))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app(prog_name="python -m bench.locks")
