"""What the WAN emulator adds on top of the delay it is told to add, and whether it
throttles a bulk transfer: the figures tests/test_wan.py used to bound (a loaded machine
can add any amount, so the tests check delays from below only).

    python -m bench.wan [--rtt-ms 100] [--samples 50] [--megabytes 5]

Prints a table and writes bench/results/wan.json. Starts an echo server and an emulator
in this process, on 127.0.0.1; nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from bench.runner import bench_app
from cluster.stats import percentile
from cluster.wan import WanEmulator

DEFAULT_JSON_OUT = Path(__file__).resolve().parent / "results" / "wan.json"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _round_trips(port: int, n: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            writer.write(b"ping")
            await writer.drain()
            await reader.readexactly(4)
            out.append(time.perf_counter() - start)
        return out
    finally:
        writer.transport.abort()


async def _bulk(port: int, size: int) -> float:
    payload = os.urandom(size)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async def send() -> None:
            for offset in range(0, size, 256 * 1024):
                writer.write(payload[offset:offset + 256 * 1024])
                await writer.drain()

        start = time.perf_counter()
        sender = asyncio.create_task(send())
        echoed = await reader.readexactly(size)
        elapsed = time.perf_counter() - start
        await sender
        assert echoed == payload
        return elapsed
    finally:
        writer.transport.abort()


async def _bench(args: SimpleNamespace) -> dict[str, Any]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    wan = WanEmulator(scale=1.0, seed=7)
    try:
        direct = await _round_trips(port, args.samples)
        link = await wan.add_link("us-east", "eu-west", "grpc", "127.0.0.1", port,
                                  rtt_seconds=args.rtt_ms / 1000)
        through = await _round_trips(link.listen_port, args.samples)
        bulk = await _bulk(link.listen_port, args.megabytes * 1024 * 1024)
    finally:
        await wan.close()
        server.close()
        await server.wait_closed()
    return {"direct_ms": [x * 1000 for x in direct], "link_ms": [x * 1000 for x in through],
            "bulk_seconds": bulk}


app = bench_app()


@app.command(help="What the WAN emulator adds beyond the delay it is told to add, and "
                  "whether it throttles a bulk transfer.")
def cli(rtt_ms: Annotated[float, typer.Option(min=0.0, help="the link's round trip")] = 100.0,
        samples: Annotated[int, typer.Option(min=1, help="round trips measured")] = 50,
        megabytes: Annotated[int, typer.Option(min=1, help="bulk transfer size")] = 5,
        json_out: Annotated[Path, typer.Option(help="result file")] = DEFAULT_JSON_OUT,
        ) -> None:
    """The benchmark's options; exits with its exit code."""
    raise typer.Exit(main(SimpleNamespace(rtt_ms=rtt_ms, samples=samples, megabytes=megabytes,
                                          json_out=json_out)))


def main(args: SimpleNamespace) -> int:
    """Measure, print the table and write the JSON."""
    console = Console()
    result = asyncio.run(_bench(args))
    link, direct = sorted(result["link_ms"]), sorted(result["direct_ms"])
    added = [x - args.rtt_ms for x in link]
    table = Table(title=f"WAN emulator, rtt {args.rtt_ms:.0f} ms, {args.samples} round trips")
    for col in ("", "p50 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    for name, values in (("direct", direct), ("through the link", link),
                         ("added beyond the rtt", added)):
        table.add_row(name, f"{statistics.median(values):.2f}",
                      f"{percentile(values, 99):.2f}", f"{max(values):.2f}")
    console.print(table)
    mb = args.megabytes
    console.print(f"bulk: {mb} MiB echoed in {result['bulk_seconds']:.2f} s "
                  f"({2 * mb / result['bulk_seconds']:.0f} MiB/s both ways; one rtt is "
                  f"{args.rtt_ms / 1000:.2f} s)")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({
        "config": {"rtt_ms": args.rtt_ms, "samples": args.samples, "megabytes": mb},
        "environment": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load": os.getloadavg()},
        "result": result}, indent=2))
    console.print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    app(prog_name="python -m bench.wan")
