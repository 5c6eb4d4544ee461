"""`paycluster`: the operator's command line for the local lab.

    paycluster up [--regions N] [--data-dir DIR] [--detach]
    paycluster status [--data-dir DIR] [--json]
    paycluster down [--data-dir DIR]
    paycluster demo [--data-dir DIR] [--payments N]
    paycluster bench [bench options, see `paycluster bench --help`]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import httpx
import psutil
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from cluster.lab import (
    REGION_NAMES,
    Cluster,
    ClusterError,
    is_ours,
    read_cluster,
    start_cluster,
    stop_cluster,
)
from cluster.servers import ServerStartError

app = typer.Typer(help="Run the paycluster local lab: real PostgreSQL, Redis, NATS and region "
                       "nodes on 127.0.0.1.", no_args_is_help=True, add_completion=False)


def make_console(stderr: bool = False) -> Console:
    """A rich Console; when output is piped (CI logs, files) it is 140 columns wide instead
    of rich's 80, so that tables are not truncated."""
    probe = Console(stderr=stderr)
    if probe.is_terminal or os.environ.get("COLUMNS"):
        return probe
    return Console(stderr=stderr, width=140)


console = make_console()
err_console = make_console(stderr=True)

DEFAULT_DATA_DIR = Path("data")

DataDir = Annotated[Path, typer.Option("--data-dir", "-d", help="where the lab keeps its files "
                                       "and cluster.json")]


class _Stop(Exception):
    """Raised in the main thread by SIGTERM/SIGHUP so cleanup runs as for Ctrl-C."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception, so `finally` blocks stop our processes."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Ignore Ctrl-C / SIGTERM / SIGHUP while we stop things: a second signal during
    shutdown must not leave half the lab running."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _start(data_dir: Path, regions: int, detach: bool) -> Cluster:
    with console.status(f"starting {regions} region(s) in {data_dir.resolve()} ..."):
        t0 = time.perf_counter()
        try:
            cluster = start_cluster(data_dir, regions=regions, detach=detach)
        except (ClusterError, ServerStartError, ValueError) as exc:
            err_console.print(f"[red]could not start the cluster:[/] {exc}")
            raise typer.Exit(1) from None
        except (KeyboardInterrupt, _Stop):
            # start_cluster has already stopped whatever it had started.
            err_console.print("interrupted while starting; everything started was stopped")
            raise typer.Exit(130) from None
    console.print(f"[green]✓[/] {regions} region(s) up in {time.perf_counter() - t0:.1f}s")
    return cluster


_KINDS = ("node", "postgres", "redis", "nats")


def _endpoints_table(doc: dict[str, Any]) -> Table:
    """Where to reach each region: API, PostgreSQL, Redis, NATS, with pids."""
    table = Table(title=f"cluster in {doc.get('data_dir')}", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("region", no_wrap=True)
    table.add_column("server", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("pid", justify="right")
    for name, region in doc.get("regions", {}).items():
        rows = (("api", region["api_url"], region["node"]["pid"]),
                ("postgres", region["postgres_dsn"], region["postgres"]["pid"]),
                ("redis", region["redis_url"], region["redis"]["pid"]),
                ("nats", region["nats_url"], region["nats"]["pid"]))
        for i, (kind, address, pid) in enumerate(rows):
            table.add_row(name if i == 0 else "", kind, address, str(pid),
                          end_section=i == len(rows) - 1)
    return table


def _status_table(doc: dict[str, Any], probes: dict[str, dict[str, Any]]) -> Table:
    """Per region: API URL, readiness, and each process's pid with alive/dead."""
    table = Table(title=f"cluster in {doc.get('data_dir')} ({doc.get('status')})",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("region", no_wrap=True)
    table.add_column("api", no_wrap=True)
    table.add_column("ready", no_wrap=True)
    for kind in _KINDS:
        table.add_column(kind, justify="right", no_wrap=True)
    for name, probe in probes.items():
        ready = "[green]ready[/]" if probe["ready"] else f"[red]{probe['detail']}[/]"
        cells = []
        for kind in _KINDS:
            pid, alive = probe["pids"].get(kind, ("-", False))
            cells.append(f"{pid} " + ("[green]✓[/]" if alive else "[red]✗[/]"))
        table.add_row(name, probe["api_url"], ready, *cells)
    return table


def _failing_checks(probes: dict[str, dict[str, Any]]) -> list[str]:
    """Readiness checks that did not answer "ok", as `region: check = value`."""
    out = []
    for name, probe in probes.items():
        for check, value in (probe.get("checks") or {}).items():
            if value != "ok":
                out.append(f"{name}: {check} = {value}")
    return out


@app.command()
def up(regions: Annotated[int, typer.Option(
           "--regions", "-r", help=f"how many regions (1-{len(REGION_NAMES)})")] = 1,
       data_dir: DataDir = DEFAULT_DATA_DIR,
       detach: Annotated[bool, typer.Option(help="start and return, leaving it running")] = False,
       ) -> None:
    """Start the lab; in the foreground until Ctrl-C / SIGTERM, then stop it cleanly."""
    with _terminate_as_interrupt():
        cluster = _start(data_dir, regions, detach)
        try:
            console.print(_endpoints_table(read_cluster(data_dir)))
            console.print(f"cluster.json: {cluster.cluster_file}")
            if detach:
                console.print(f"running detached; stop with [bold]paycluster down --data-dir "
                              f"{data_dir}[/]")
                return
            console.print("running; press Ctrl-C to stop")
            _watch(cluster)
        except (KeyboardInterrupt, _Stop):
            console.print("stopping ...")
        finally:
            if not detach:
                with _shielded():
                    cluster.stop()
                console.print("[green]✓[/] stopped")


def _watch(cluster: Cluster) -> None:
    """Sleep until interrupted, reporting any process that dies on its own."""
    reported: set[int] = set()
    while True:
        for region in cluster.regions:
            for proc in (region.node, *region.servers.all()):
                if proc.pid not in reported and not proc.is_running():
                    reported.add(proc.pid)
                    err_console.print(f"[yellow]{region.name} {proc.kind} (pid {proc.pid}) "
                                      f"exited; log: {proc.log_path}[/]")
        time.sleep(1.0)


@app.command()
def down(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Stop every process listed in DIR/cluster.json (by pid)."""
    try:
        stopped = stop_cluster(data_dir)
    except ClusterError as exc:
        err_console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    for region, kind, pid in stopped:
        console.print(f"[green]✓[/] stopped {region} {kind} (pid {pid})")
    if not stopped:
        console.print("nothing was running")


def probe_region(region: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    """Readiness (GET /health/ready) and liveness of every pid of one cluster.json region."""
    pids = {kind: (region[kind]["pid"], is_ours(region[kind])) for kind in _KINDS if kind in region}
    ready, detail, checks = False, "", None
    try:
        resp = httpx.get(f"{region['api_url']}/health/ready", timeout=timeout)
        ready = resp.status_code == 200
        with contextlib.suppress(ValueError):
            checks = resp.json().get("checks")
        detail = f"HTTP {resp.status_code}"
    except httpx.HTTPError as exc:
        detail = type(exc).__name__
    return {"api_url": region["api_url"], "ready": ready, "detail": detail, "checks": checks,
            "pids": pids}


@app.command()
def status(data_dir: DataDir = DEFAULT_DATA_DIR,
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
           ) -> None:
    """Per region: API URL, /health/ready result and whether each pid is alive.

    Exits 1 unless every region is ready and every process alive.
    """
    try:
        doc = read_cluster(data_dir)
    except ClusterError as exc:
        err_console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    probes = {name: probe_region(region) for name, region in doc.get("regions", {}).items()}
    healthy = bool(probes) and all(
        p["ready"] and all(alive for _, alive in p["pids"].values()) for p in probes.values())
    if as_json:
        out = {"data_dir": doc.get("data_dir"), "status": doc.get("status"), "healthy": healthy,
               "regions": {name: {**p, "pids": {k: {"pid": pid, "alive": alive}
                                                for k, (pid, alive) in p["pids"].items()}}
                           for name, p in probes.items()}}
        typer.echo(json.dumps(out, indent=2))
    else:
        console.print(_status_table(doc, probes))
        owner = doc.get("owner_pid")
        if owner and doc.get("status") == "running" and not psutil.pid_exists(int(owner)):
            console.print(f"[yellow]the foreground `paycluster up` (pid {owner}) is gone; its "
                          "processes are listed above[/]")
        for line in _failing_checks(probes):
            console.print(f"[yellow]check {line}[/]")
        console.print("[green]healthy[/]" if healthy else "[red]not healthy[/]")
    if not healthy:
        raise typer.Exit(1)


@app.command()
def demo(data_dir: Annotated[Path | None, typer.Option(
            "--data-dir", "-d", help="where to run the lab (default: a temp dir, removed "
                                     "afterwards)")] = None,
         payments: Annotated[int, typer.Option(help="payments to run", min=1)] = 300,
         concurrency: Annotated[int, typer.Option(help="requests in flight", min=1)] = 8,
         seed: Annotated[int | None, typer.Option(help="random seed")] = None,
         ) -> None:
    """Start a 1-region lab, run the demo workload, print a summary, stop everything."""
    from cluster.demo import DemoError, print_summary, run_demo

    temp = data_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="paycluster-demo-")) if data_dir is None else data_dir
    ok = False
    with _terminate_as_interrupt():
        cluster = _start(run_dir, 1, detach=False)
        try:
            api_url = cluster.regions[0].api_url
            console.print(f"region us-east at {api_url}")
            result = run_demo(api_url, payments=payments, concurrency=concurrency, seed=seed,
                              console=console)
            print_summary(result, console)
            ok = result.ok
        except (DemoError, httpx.HTTPError) as exc:
            err_console.print(f"[red]demo failed:[/] {exc}")
            err_console.print(f"node log: {cluster.regions[0].node.log_path}")
        except (KeyboardInterrupt, _Stop):
            err_console.print("interrupted")
        finally:
            with _shielded(), console.status("stopping the lab ..."):
                cluster.stop()
            console.print("[green]✓[/] lab stopped")
    if temp and ok:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif temp:
        err_console.print(f"kept {run_dir} for the logs")
    if not ok:
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Payments/s and latency over HTTP vs pgbench on the same PostgreSQL (bench/payments.py).

    All options are bench/payments.py's; see `paycluster bench --help`.
    """
    from bench.payments import main

    raise typer.Exit(main(list(ctx.args)))

