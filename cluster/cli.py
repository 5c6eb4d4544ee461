"""`paycluster`: the operator's command line for the local lab.

    paycluster up [--regions N] [--wan-scale S] [--routers N] [--data-dir DIR] [--detach]
                  [--durability local|regional] [--buddy R=B ...]
    paycluster status [--data-dir DIR] [--json]
    paycluster router status [--json] | drain REGION | undrain REGION
                      | weight REGION (N | --reset) | resolve [--client-region R] [--geo LAT,LON]
                      | bench [bench/router.py options]
    paycluster down [--data-dir DIR]
    paycluster link list | cut A B [--mode reset|blackhole] [--one-way] | heal A B [--one-way]
                         | set A B [--rtt-ms X] [--jitter-ms Y] [--one-way]
    paycluster region add NAME
    paycluster failover planned --home H --to B [--data-dir DIR] [--catch-up-timeout S] [--json]
    paycluster reconcile list [--json] | resolve --home H --epoch E --item ID
                         --resolution acknowledge|claw_back|write_off --note TEXT
                         | statement --region R [--file F] [--json P] [--markdown P]
    paycluster durability show | set REGION local|regional [--buddy B]
                          | bench [bench/durability.py options]
    paycluster drill planned|crash|partition --region R [--duration S] [--rate N]
                     [--report DIR] [--data-dir DIR] [--wan-scale X] [--durability MODE]
    paycluster demo [--data-dir DIR] [--regions N] [--wan-scale S] [--payments N] [--no-router]
    paycluster bench [bench options, see `paycluster bench --help`]

This module assembles the app and holds up/down/region/demo; the other commands live in
status_cli.py, links_cli.py (links and routers), failover_cli.py (failover, durability,
reconcile), drill/cli.py, channel_cli.py, statement_cli.py and deploy.py. The benchmarks
(`bench`, `router bench`, `durability bench`) are added above this layer, by
paycluster/cli.py, which is what the installed `paycluster` runs.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich import box
from rich.table import Table

from cluster.channel_cli import channel_app
from cluster.cli_options import (
    DEFAULT_DATA_DIR,
    HELP_CONTEXT,
    DataDir,
    DurabilityMode,
    RegionCount,
    Routers,
    WanScale,
)
from cluster.console import Stop, console, err_console, shielded, terminate_as_interrupt
from cluster.deploy import deploy_app
from cluster.drill.cli import drill_app
from cluster.failover_cli import durability_app, failover_app, reconcile_app
from cluster.lab import (
    Cluster,
    ClusterError,
    add_region,
    read_cluster,
    start_cluster,
    stop_cluster,
)
from cluster.links_cli import link_app, router_app
from cluster.servers import ServerStartError, is_ours
from cluster.status_cli import KINDS, status

app = typer.Typer(help="Run the paycluster local lab: real PostgreSQL, Redis, NATS and region "
                       "nodes on 127.0.0.1, with an emulated WAN between the regions.",
                  no_args_is_help=True, add_completion=False,
                  context_settings=HELP_CONTEXT)
region_app = typer.Typer(help="Change the regions of a running lab.", no_args_is_help=True)
app.add_typer(link_app, name="link")
app.add_typer(region_app, name="region")
app.add_typer(router_app, name="router")
app.add_typer(failover_app, name="failover")
app.add_typer(durability_app, name="durability")
app.add_typer(drill_app, name="drill")
app.add_typer(channel_app, name="channel")
# The steps of a containerised deployment (docker-compose.multiregion.yml).
app.add_typer(deploy_app, name="deploy")
app.add_typer(reconcile_app, name="reconcile")


def _version(value: bool) -> None:
    """--version: the installed package's version (its metadata, not a copy of it)."""
    if value:
        typer.echo(f"paycluster {package_version('paycluster')}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="print the version and exit")] = False) -> None:
    """Run the paycluster local lab: real PostgreSQL, Redis, NATS and region nodes on
    127.0.0.1, with an emulated WAN between the regions."""


def _start(data_dir: Path, regions: int, wan_scale: float, detach: bool,
           routers: int = 1, durability: str | None = None,
           buddies: dict[str, str] | None = None) -> Cluster:
    where = data_dir.resolve()
    routers = min(routers, regions)
    with console.status(f"starting {regions} region(s) in {where} (WAN scale {wan_scale:g}) ..."):
        t0 = time.perf_counter()
        try:
            cluster = start_cluster(data_dir, regions=regions, wan_scale=wan_scale,
                                    detach=detach, routers=routers, durability=durability,
                                    buddies=buddies)
        except (ClusterError, ServerStartError, ValueError, TimeoutError) as exc:
            err_console.print(f"[red]could not start the cluster:[/] {exc}")
            raise typer.Exit(1) from None
        except (KeyboardInterrupt, Stop):
            # start_cluster has already stopped whatever it had started.
            err_console.print("interrupted while starting; everything started was stopped")
            raise typer.Exit(130) from None
    console.print(f"[green]✓[/] {regions} region(s) ready in {time.perf_counter() - t0:.1f}s")
    return cluster


def _endpoints_table(doc: dict[str, Any]) -> Table:
    """Where to reach each region: API, gRPC, PostgreSQL, Redis, NATS, with pids."""
    table = Table(title=f"cluster in {doc.get('data_dir')}", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("region", no_wrap=True)
    table.add_column("server", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("pid", justify="right")
    for name, region in doc.get("regions", {}).items():
        rows = [("api", region["api_url"], region.get("node", {}).get("pid", "-"))]
        if region.get("grpc_port"):
            rows.append(("grpc", f"127.0.0.1:{region['grpc_port']}", "(node)"))
        rows += [("postgres", region["postgres_dsn"], region["postgres"]["pid"]),
                 ("redis", region["redis_url"], region["redis"]["pid"]),
                 ("nats", region["nats_url"], region["nats"]["pid"])]
        for i, (kind, address, pid) in enumerate(rows):
            table.add_row(name if i == 0 else "", kind, address, str(pid),
                          end_section=i == len(rows) - 1)
    wan = doc.get("wan")
    if isinstance(wan, dict):
        table.add_row("wan", "control", wan["control_url"], str(wan["pid"]))
    for router in doc.get("routers") or []:
        table.add_row(f"router ({router['site']})", "public", router["url"],
                      str(router["pid"]))
        table.add_row("", "admin", router["admin_url"], "(router)", end_section=True)
    return table


@app.command()
def up(regions: RegionCount = 3,
       wan_scale: WanScale = 1.0,
       routers: Routers = 1,
       data_dir: DataDir = DEFAULT_DATA_DIR,
       detach: Annotated[bool, typer.Option(help="start and return, leaving it running")] = False,
       durability: Annotated[DurabilityMode | None, typer.Option(
           help="local (asynchronous) or regional (every commit also in a buddy region) for "
                "every region; default: what the data dir had, else local")] = None,
       buddy: Annotated[list[str] | None, typer.Option(
           help="regional: R=B makes B the buddy of R (default: R's nearest region); "
                "repeatable")] = None,
       ) -> None:
    """Start the lab (regions, WAN, geo router); in the foreground until Ctrl-C / SIGTERM,
    then stop it cleanly."""
    buddies = {}
    for item in buddy or []:
        region_name, sep, buddy_name = item.partition("=")
        if not sep or not region_name or not buddy_name:
            err_console.print(f"[red]--buddy {item}: expected REGION=BUDDY[/]")
            raise typer.Exit(2)
        buddies[region_name.strip()] = buddy_name.strip()
    with terminate_as_interrupt():
        cluster = _start(data_dir, regions, wan_scale, detach, routers, durability, buddies)
        try:
            doc = read_cluster(data_dir)
            console.print(_endpoints_table(doc))
            if doc.get("links"):
                console.print(f"{len(doc['links'])} WAN links; see [bold]paycluster link list[/]")
            if cluster.routers:
                console.print(f"clients: [bold]{cluster.router_url}[/] (geo router; "
                              "X-Client-Region / X-Client-Geo say where a client is); see "
                              "[bold]paycluster router status[/]")
            console.print(f"cluster.json: {cluster.cluster_file}")
            # Never the key itself on the console (logs): where it is and how to send it.
            console.print("API: every /v1 call needs 'Authorization: Bearer <key>'; the admin "
                          "key is admin_key in cluster.json (mode 0600); see docs/security.md")
            console.print("durability: " + _durability_line(cluster.durability))
            if detach:
                console.print(f"running detached; stop with [bold]paycluster down --data-dir "
                              f"{data_dir}[/]")
                return
            console.print("running; press Ctrl-C to stop")
            _watch(data_dir)
        except (KeyboardInterrupt, Stop):
            console.print("stopping ...")
        finally:
            if not detach:
                with shielded():
                    cluster.stop()
                console.print("[green]✓[/] stopped")


def _durability_line(recorded: dict[str, Any]) -> str:
    """`us-east regional -> eu-west, ...` from cluster.json's durability record."""
    return ", ".join(f"{name} {entry.get('mode')}"
                     + (f" -> {entry['buddy']}" if entry.get("buddy") else "")
                     for name, entry in recorded.items()) or "local"


def _watch(data_dir: Path) -> None:
    """Sleep until interrupted, reporting any listed process that dies on its own, and a
    regional region whose buddy has not been a synchronous standby for a while (its
    commits wait: the hint says how to stop waiting).

    Reads cluster.json every second, so processes another command added (`region add`)
    are watched too; nothing is reported while the cluster is being changed.
    """
    from cluster.durability import StandbyWatch, look

    reported: set[int] = set()
    standbys, ticks = StandbyWatch(), 0
    while True:
        ticks += 1
        with contextlib.suppress(ClusterError):
            doc = read_cluster(data_dir)
            if doc.get("status") == "running":
                for region, kind, entry in _listed(doc):
                    pid = int(entry["pid"])
                    if pid not in reported and not is_ours(entry):
                        reported.add(pid)
                        err_console.print(f"[yellow]{region} {kind} (pid {pid}) exited; log: "
                                          f"{entry.get('log')}[/]")
                regions = doc.get("regions", {})
                for name, entry in (doc.get("durability") or {}).items():
                    if ticks % 5 or name not in regions:
                        continue
                    line = standbys.observe(
                        look(regions[name]["postgres_dsn"], name, list(regions))
                        if entry.get("mode") == "regional" else None, name)
                    if line:
                        err_console.print(f"[yellow]{line}[/]")
        time.sleep(1.0)


def _listed(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for name, region in doc.get("regions", {}).items():
        for kind in KINDS:
            if isinstance(region.get(kind), dict):
                yield name, kind, region[kind]
    if isinstance(doc.get("wan"), dict):
        yield "wan", "emulator", doc["wan"]
    for router in doc.get("routers") or []:
        if isinstance(router, dict):
            yield f"router ({router.get('site')})", "router", router


@app.command()
def down(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Stop every process listed in DIR/cluster.json (by pid)."""
    try:
        stopped = stop_cluster(data_dir)
    except ClusterError as exc:
        err_console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    for region, kind, pid in stopped:
        what = {"wan": "WAN emulator", "channel": "channel (acquirer simulator)"}.get(
            kind, f"{region} {kind}")
        console.print(f"[green]✓[/] stopped {what} (pid {pid})")
    if not stopped:
        console.print("nothing was running")


app.command()(status)


# --------------------------------------------------------------------------- regions


@region_app.command("add")
def region_add(name: Annotated[str, typer.Argument(help="region to add, e.g. us-west")],
               data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Bring a new region into the running lab: servers, WAN links, migration, replication
    (one copy from a donor region, then streams), its node; then restart the other nodes
    one at a time so they know the new peer."""
    t0 = time.perf_counter()
    with terminate_as_interrupt(), console.status(f"adding {name} ..."):
        try:
            region = add_region(data_dir, name)
        except (ClusterError, ServerStartError, ValueError, TimeoutError) as exc:
            err_console.print(f"[red]could not add {name}:[/] {exc}")
            raise typer.Exit(1) from None
        except (KeyboardInterrupt, Stop):
            err_console.print(f"interrupted; what was started for {name} was stopped")
            raise typer.Exit(130) from None
        except Exception as exc:  # e.g. the replication wiring refused
            err_console.print(f"[red]could not add {name}:[/] {type(exc).__name__}: {exc}")
            raise typer.Exit(1) from None
    console.print(f"[green]✓[/] {name} joined in {time.perf_counter() - t0:.1f}s; API at "
                  f"{region.api_url}")


# --------------------------------------------------------------------------- demo


@app.command()
def demo(data_dir: Annotated[Path | None, typer.Option(
            "--data-dir", "-d", help="where to run the lab (default: a temp dir, removed "
                                     "afterwards)")] = None,
         regions: RegionCount = 3,
         wan_scale: WanScale = 1.0,
         payments: Annotated[int, typer.Option(
             help="payments to run", min=1, envvar="PAYCLUSTER_DEMO_PAYMENTS")] = 600,
         concurrency: Annotated[int, typer.Option(help="requests in flight", min=1)] = 16,
         seed: Annotated[int | None, typer.Option(help="random seed")] = None,
         watch_every: Annotated[int, typer.Option(
             min=1, help="measure convergence on every n-th cross-region payment (each "
                         "watch polls two regions every 20 ms)")] = 2,
         router: Annotated[bool, typer.Option(
             help="send the traffic through a geo router (--no-router: to the regions "
                  "directly)")] = True,
         ) -> None:
    """Start a lab with a geo router, run the demo workload through the router across the
    regions, print totals, convergence and routing figures, stop everything."""
    from cluster.demo import DemoError, print_summary, run_demo

    temp = data_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="paycluster-demo-")) if data_dir is None else data_dir
    ok = False
    with terminate_as_interrupt():
        cluster = _start(run_dir, regions, wan_scale, detach=False,
                         routers=1 if router else 0)
        try:
            result = run_demo(cluster, payments=payments, concurrency=concurrency, seed=seed,
                              console=console, watch_every=watch_every, use_router=router)
            print_summary(result, console)
            ok = result.ok
        except (DemoError, httpx.HTTPError) as exc:
            err_console.print(f"[red]demo failed:[/] {exc}")
            for region in cluster.regions:
                if region.node is not None:
                    err_console.print(f"{region.name} node log: {region.node.log_path}")
        except (KeyboardInterrupt, Stop):
            err_console.print("interrupted")
        finally:
            with shielded(), console.status("stopping the lab ..."):
                cluster.stop()
            console.print("[green]✓[/] lab stopped")
    if temp and ok:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif temp:
        err_console.print(f"kept {run_dir} for the logs")
    if not ok:
        raise typer.Exit(1)
