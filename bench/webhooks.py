"""Webhook delivery latency: from a payment's commit to the event at a real receiver.

A local HTTP receiver (aiohttp, 127.0.0.1) is registered as an admin endpoint for
`payment.succeeded`; then `--payments` automatic payments run at each concurrency of
`--concurrency` (default 1 and 25), after a baseline round at the highest concurrency
with no endpoint registered (payments/s only). A payment counts as committed when its `201` arrives
(the commit happened before); its latency ends when the receiver has the event. Every
signature is checked with `region_node.webhooks.signing.verify`, and every event must
arrive exactly once.

    python -m bench.webhooks                         # starts its own region (lab)
    python -m bench.webhooks --api-url http://127.0.0.1:8000 --api-key pck_...
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import httpx
import typer
from aiohttp import web
from rich.table import Table

from bench.runner import BenchError, bench_app, guarded
from bench.stats import stop_lab
from cluster.console import make_console
from cluster.lab import start_cluster
from cluster.stats import percentile
from region_node.webhooks.signing import SIGNATURE_HEADER, SignatureError, verify

DEFAULT_JSON_OUT = Path(__file__).resolve().parent / "results" / "webhooks.json"
CURRENCY = "USD"
console = make_console()


@dataclass
class Round:
    """One run of payments at one concurrency."""

    concurrency: int
    payments: int
    seconds: float
    delivered: int
    duplicates: int
    bad_signatures: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


class Receiver:
    """Records the arrival time of every event, by the payment it is about."""

    def __init__(self) -> None:
        self.secret = ""
        self.arrived: dict[str, float] = {}
        self.seen: Counter[str] = Counter()
        self.bad_signatures = 0
        self.event = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        at = time.monotonic()
        try:
            verify(body, request.headers.get(SIGNATURE_HEADER, ""), self.secret)
        except SignatureError:
            self.bad_signatures += 1
            return web.Response(status=400)
        event = json.loads(body)
        self.seen[event["id"]] += 1
        self.arrived.setdefault(event["data"]["id"], at)
        self.event.set()
        return web.Response(status=200)


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post(path, json=body)
    if resp.status_code not in (200, 201):
        raise BenchError(f"POST {path}: {resp.status_code} {resp.text[:300]}")
    out: dict[str, Any] = resp.json()
    return out


async def _round(client: httpx.AsyncClient, receiver: Receiver, payers: list[str], payee: str,
                 n: int, concurrency: int, wait_seconds: float) -> Round:
    committed: dict[str, float] = {}
    before = dict(receiver.seen)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            pay = await _post(client, "/v1/payments", {
                "payer": payers[i % len(payers)], "payee": payee, "amount": 1,
                "currency": CURRENCY})
            committed[pay["id"]] = time.monotonic()

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    seconds = time.monotonic() - started
    deadline = time.monotonic() + wait_seconds
    while not all(p in receiver.arrived for p in committed):
        if time.monotonic() > deadline:
            break
        receiver.event.clear()
        try:
            await asyncio.wait_for(receiver.event.wait(), 0.5)
        except TimeoutError:
            pass
    await asyncio.sleep(0.5)  # a duplicate would show up now
    lat = sorted((receiver.arrived[p] - t) * 1000 for p, t in committed.items()
                 if p in receiver.arrived)
    new = {k: v - before.get(k, 0) for k, v in receiver.seen.items()}
    return Round(concurrency=concurrency, payments=n, seconds=round(seconds, 3),
                 delivered=len(lat), duplicates=sum(v - 1 for v in new.values() if v > 1),
                 bad_signatures=receiver.bad_signatures,
                 p50_ms=_pct(lat, 50), p90_ms=_pct(lat, 90), p99_ms=_pct(lat, 99),
                 max_ms=_pct(lat, 100))


def _pct(sorted_ms: list[float], pct: float) -> float:
    """Nearest-rank percentile, 0 when nothing was measured (keeps the JSON valid)."""
    return round(percentile(sorted_ms, pct), 1) if sorted_ms else 0.0


async def _accounts(client: httpx.AsyncClient, args: SimpleNamespace
                    ) -> tuple[list[str], str]:
    """One funded payer per concurrent client (no hot row), and a merchant payee."""
    payers = []
    for _ in range(max(args.concurrency)):
        acc = await _post(client, "/v1/accounts", {"currency": CURRENCY})
        await _post(client, f"/v1/accounts/{acc['id']}/deposits",
                    {"amount": 10 * args.payments})
        payers.append(acc["id"])
    payee = (await _post(client, "/v1/accounts", {"currency": CURRENCY, "kind": "merchant"}))
    return payers, str(payee["id"])


async def _bench(args: SimpleNamespace, api_url: str, api_key: str | None) -> list[Round]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        port = runner.addresses[0][1]
        async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30.0) as client:
            payers, payee = await _accounts(client, args)
            # Payments/s without any endpoint, for comparison: deliveries must not slow
            # payments down.
            baseline = await _round(client, receiver, payers, payee, args.payments,
                                    max(args.concurrency), 0.0)
            endpoint = await _post(client, "/v1/webhook_endpoints", {
                "url": f"http://127.0.0.1:{port}/hook", "event_types": ["payment.succeeded"]})
            receiver.secret = endpoint["secret"]
            rounds = [baseline]
            for c in args.concurrency:
                rounds.append(await _round(client, receiver, payers, payee, args.payments, c,
                                           args.timeout))
            await client.delete(f"/v1/webhook_endpoints/{endpoint['id']}")
            return rounds
    finally:
        await runner.cleanup()


def _report(rounds: list[Round], args: SimpleNamespace, api_url: str,
            self_started: bool) -> None:
    table = Table(title="webhook delivery: payment commit -> receiver")
    for col in ("concurrency", "payments", "payments/s", "delivered", "duplicates",
                "bad sigs", "p50 ms", "p90 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rounds):
        if i == 0:  # the baseline: no endpoint registered, nothing to deliver
            table.add_row(f"{r.concurrency} (no endpoint)", str(r.payments),
                          f"{r.payments / r.seconds:.0f}", *["-"] * 7)
            continue
        table.add_row(str(r.concurrency), str(r.payments), f"{r.payments / r.seconds:.0f}",
                      str(r.delivered), str(r.duplicates), str(r.bad_signatures),
                      f"{r.p50_ms:.0f}", f"{r.p90_ms:.0f}", f"{r.p99_ms:.0f}",
                      f"{r.max_ms:.0f}")
    console.print(table)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({
        "benchmark": "webhooks", "at": datetime.now(UTC).isoformat(),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": {"api_url": api_url, "self_started": self_started,
                   "payments": args.payments, "concurrency": args.concurrency},
        "rounds": [asdict(r) for r in rounds]}, indent=2))
    console.print(f"wrote {args.json_out}")


app = bench_app()


@app.command(help="Webhook delivery: from a payment's commit to its event at a receiver, "
                  "none lost, none duplicated.")
def cli(api_url: Annotated[str | None, typer.Option(
            help="a running region (default: start one)")] = None,
        api_key: Annotated[str | None, typer.Option(
            envvar="PAYCLUSTER_API_KEY", help="admin API key (default: the lab's)")] = None,
        payments: Annotated[int, typer.Option(min=1, help="payments per round")] = 200,
        concurrency: Annotated[list[int] | None, typer.Option(
            "--concurrency", "-c", min=1, help="clients in flight; repeat for several rounds "
                                               "(default: 1 and 25)")] = None,
        timeout: Annotated[float, typer.Option(min=0.1, help="wait for the last event")] = 60.0,
        json_out: Annotated[Path, typer.Option(help="result file")] = DEFAULT_JSON_OUT,
        ) -> None:
    """The benchmark's options; exits with its exit code."""
    args = SimpleNamespace(api_url=api_url, api_key=api_key, payments=payments,
                           concurrency=concurrency or [1, 25], timeout=timeout,
                           json_out=json_out)
    raise typer.Exit(guarded(lambda: main(args), console))


def main(args: SimpleNamespace) -> int:
    """Run the benchmark; returns the exit code (1 if an event was lost or duplicated)."""
    if args.api_url:
        rounds = asyncio.run(_bench(args, args.api_url.rstrip("/"), args.api_key))
        _report(rounds, args, args.api_url, self_started=False)
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="paycluster-bench-webhooks-"))
        with console.status("starting one region ..."):
            cluster = start_cluster(data_dir, regions=1, detach=False)
        code = 1
        try:
            api_url = cluster.regions[0].api_url
            rounds = asyncio.run(_bench(args, api_url, args.api_key or cluster.admin_key))
            _report(rounds, args, api_url, self_started=True)
            code = 0
        finally:
            stop_lab(cluster, console, "region", data_dir, keep=code != 0)
    bad = any(r.delivered < r.payments or r.duplicates or r.bad_signatures
              for r in rounds[1:])
    return 1 if bad else 0


if __name__ == "__main__":
    app(prog_name="python -m bench.webhooks")
