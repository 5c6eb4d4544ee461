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
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import httpx
import psutil
import typer
from rich import box
from rich.table import Table

from cluster.channel_cli import channel_app
from cluster.cli_options import (
    DEFAULT_CUT_MODE,
    DEFAULT_DATA_DIR,
    HELP_CONTEXT,
    CutMode,
    DataDir,
    DurabilityMode,
    RegionArg,
    RegionCount,
    Resolution,
    Routers,
    WanScale,
)
from cluster.console import Stop, console, err_console, shielded, terminate_as_interrupt
from cluster.deploy import deploy_app
from cluster.drill_cli import drill_app
from cluster.lab import (
    Cluster,
    ClusterError,
    add_region,
    is_ours,
    read_cluster,
    start_cluster,
    stop_cluster,
)
from cluster.servers import ServerStartError
from cluster.statement_cli import reconcile_statement
from cluster.wan import WanControl, WanControlError
from geo_router.client import RouterAdmin, RouterAdminError, resolve

app = typer.Typer(help="Run the paycluster local lab: real PostgreSQL, Redis, NATS and region "
                       "nodes on 127.0.0.1, with an emulated WAN between the regions.",
                  no_args_is_help=True, add_completion=False,
                  context_settings=HELP_CONTEXT)
link_app = typer.Typer(help="Inspect and change the emulated WAN links between regions.",
                       no_args_is_help=True)
region_app = typer.Typer(help="Change the regions of a running lab.", no_args_is_help=True)
router_app = typer.Typer(help="Operate the lab's geo routers: state, drain, weights, resolve. "
                              "Changes go to every router the lab runs.",
                         no_args_is_help=True)
app.add_typer(link_app, name="link")
app.add_typer(region_app, name="region")
app.add_typer(router_app, name="router")
failover_app = typer.Typer(help="Move the ownership of a home region between regions "
                                "(the failover guard).", no_args_is_help=True)
app.add_typer(failover_app, name="failover")
durability_app = typer.Typer(help="Durability mode per region: local (asynchronous) or "
                                  "regional (a buddy region's subscription is a synchronous "
                                  "standby).", no_args_is_help=True)
app.add_typer(durability_app, name="durability")
app.add_typer(drill_app, name="drill")
app.add_typer(channel_app, name="channel")
# The steps of a containerised deployment (docker-compose.multiregion.yml).
app.add_typer(deploy_app, name="deploy")


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


_KINDS = ("node", "postgres", "redis", "nats")


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
                          "key is admin_key in cluster.json (mode 0600); see README, "
                          "Security model")
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
        for kind in _KINDS:
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


# --------------------------------------------------------------------------- status


def _get_json(client: httpx.Client, url: str) -> tuple[int | None, Any]:
    """(status, JSON body or None); status None when the node did not answer."""
    try:
        resp = client.get(url)
    except httpx.HTTPError as exc:
        return None, type(exc).__name__
    try:
        return resp.status_code, resp.json()
    except ValueError:
        return resp.status_code, None


def probe_region(region: dict[str, Any], client: httpx.Client) -> dict[str, Any]:
    """One cluster.json region as its node sees itself: readiness (ready / degraded /
    unavailable / down), failing checks, stale pairs, its replication status (None if the
    node does not serve it) and whether each of its pids is alive."""
    pids = {kind: {"pid": region[kind]["pid"], "alive": is_ours(region[kind])}
            for kind in _KINDS if isinstance(region.get(kind), dict)}
    code, body = _get_json(client, f"{region['api_url']}/health/ready")
    checks: dict[str, Any]
    stale: list[str]
    if code is None:
        state, checks, stale = "down", {}, []
        detail = str(body)
    else:
        body = body if isinstance(body, dict) else {}
        state = str(body.get("status") or ("ready" if code == 200 else "unavailable"))
        checks = body.get("checks") or {}
        stale = list(body.get("stale_pairs") or [])
        detail = f"HTTP {code}"
    replication = None
    if code is not None:
        rcode, rbody = _get_json(client, f"{region['api_url']}/v1/replication/status")
        replication = rbody if rcode == 200 and isinstance(rbody, dict) else None
    channel = body.get("channel") if isinstance(body, dict) else None
    return {"api_url": region["api_url"], "state": state, "ready": state == "ready",
            "detail": detail, "checks": checks, "stale_pairs": stale,
            "channel_breaker": (channel or {}).get("breaker"),
            "replication": replication, "pids": pids}


def _ownership(doc: dict[str, Any], client: httpx.Client) -> dict[str, Any] | None:
    """`GET /v1/cluster/ownership` of the first region that answers it."""
    for region in doc.get("regions", {}).values():
        code, body = _get_json(client, f"{region['api_url']}/v1/cluster/ownership")
        if code == 200 and isinstance(body, dict):
            return body
    return None


def probe_router(entry: dict[str, Any], client: httpx.Client) -> dict[str, Any]:
    """One cluster.json router as it sees the regions: region -> effective state (None if
    its admin API does not answer)."""
    info: dict[str, Any] = {"site": entry.get("site"), "url": entry.get("url"),
                            "admin_url": entry.get("admin_url"), "pid": entry.get("pid"),
                            "alive": is_ours(entry), "states": None, "weights": None}
    code, body = _get_json(client, f"{entry.get('admin_url')}/admin/regions")
    if code == 200 and isinstance(body, dict):
        info["states"] = {r["name"]: r["state"] for r in body.get("regions", [])}
        info["weights"] = {r["name"]: r["weight"] for r in body.get("regions", [])}
    return info


def collect_status(doc: dict[str, Any], timeout: float = 3.0) -> dict[str, Any]:
    """Everything `paycluster status` shows, as one JSON-able document.

    `healthy` is True when every region is ready (not degraded), every listed process is
    alive, and (with several regions) every region reports its replication pairs within
    the SLO with zero conflicts.
    """
    # The /v1 calls need a key: the bootstrap admin's, from cluster.json (mode 0600).
    key = doc.get("admin_key")
    with httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"}
                      if key else None) as client:
        probes = {name: probe_region(region, client)
                  for name, region in doc.get("regions", {}).items()}
        ownership = _ownership(doc, client)
        routers = [probe_router(r, client) for r in doc.get("routers") or []
                   if isinstance(r, dict)]
    names = list(probes)
    wan = doc.get("wan")
    wan_info = None
    if isinstance(wan, dict):
        wan_info = {"pid": wan["pid"], "alive": is_ours(wan), "control_url": wan["control_url"],
                    "scale": wan.get("scale")}
    lag: dict[str, dict[str, float | None]] = {a: {} for a in names}
    pairs: list[dict[str, Any]] = []
    problems: list[str] = []
    slo_values: set[float] = set()
    for to, probe in probes.items():
        rep = probe["replication"]
        if len(names) > 1 and rep is None:
            problems.append(f"{to}: replication status unavailable")
            continue
        if rep is None:
            continue
        if rep.get("slo_seconds") is not None:
            slo_values.add(float(rep["slo_seconds"]))
        if rep.get("error"):
            problems.append(f"{to}: monitor cannot read its database: {rep['error']}")
        for pair in (rep.get("pairs") or {}).values():
            src = str(pair.get("from"))
            lag.setdefault(src, {})[to] = pair.get("lag_seconds")
            conflicts = {k: v for k, v in (pair.get("conflicts") or {}).items() if v}
            breach = pair.get("breach")
            pairs.append({"from": src, "to": to, "lag_seconds": pair.get("lag_seconds"),
                          "apply_running": pair.get("apply_running"),
                          "conflicts": conflicts, "breach": breach})
            if breach:
                problems.append(f"{src}->{to}: SLO breach: {breach.get('cause')}")
            elif conflicts:
                problems.append(f"{src}->{to}: conflicts {conflicts}")
    for name, probe in probes.items():
        if probe["state"] != "ready":
            failing = [f"{k}={v}" for k, v in probe["checks"].items() if v != "ok"]
            problems.append(f"{name}: {probe['state']} ({probe['detail']}"
                            + (f"; {'; '.join(failing)}" if failing else "") + ")")
        for kind, pid in probe["pids"].items():
            if not pid["alive"]:
                problems.append(f"{name}: {kind} (pid {pid['pid']}) is not running")
    if wan_info is not None and not wan_info["alive"]:
        problems.append(f"WAN emulator (pid {wan_info['pid']}) is not running")
    for router in routers:
        if not router["alive"]:
            problems.append(f"router ({router['site']}, pid {router['pid']}) is not running")
        elif router["states"] is None:
            problems.append(f"router ({router['site']}) does not answer on its admin API")
    from cluster.durability import durability_status, hint

    durability = durability_status(doc) if len(names) > 1 else {}
    problems += [f"{d['problem']}; {hint(n)}" for n, d in durability.items() if d["problem"]]
    slo_ok = not any(p["breach"] for p in pairs) and not any(p["conflicts"] for p in pairs)
    return {
        "data_dir": doc.get("data_dir"), "status": doc.get("status"),
        "healthy": bool(probes) and not problems, "problems": problems,
        "regions": probes, "wan": wan_info, "links": len(doc.get("links") or []),
        "routers": routers,
        "ownership": (ownership or {}).get("ownership"),
        "ownership_source": (ownership or {}).get("region"),
        "lag_seconds": lag, "pairs": pairs,
        "slo_seconds": max(slo_values) if slo_values else None, "slo_ok": slo_ok,
        "conflicts_total": sum(sum(p["conflicts"].values()) for p in pairs),
        "durability": durability,
    }


_BREAKER_COLORS = {"closed": "green", "half_open": "yellow", "open": "red"}


def _regions_table(status: dict[str, Any]) -> Table:
    table = Table(title=f"cluster in {status['data_dir']} ({status['status']})",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("region", "api", "state", "channel", *_KINDS):
        table.add_column(col, no_wrap=True, justify="right" if col in _KINDS else "left")
    colors = {"ready": "green", "degraded": "yellow"}
    for name, probe in status["regions"].items():
        state = probe["state"]
        label = f"[{colors.get(state, 'red')}]{state}[/]"
        if probe["stale_pairs"]:
            label += f" [yellow](stale: {', '.join(probe['stale_pairs'])})[/]"
        cells = []
        for kind in _KINDS:
            pid = probe["pids"].get(kind)
            cells.append("-" if pid is None else
                         f"{pid['pid']} " + ("[green]✓[/]" if pid["alive"] else "[red]✗[/]"))
        breaker = probe.get("channel_breaker")
        table.add_row(name, probe["api_url"], label,
                      "-" if breaker is None else f"[{_BREAKER_COLORS[breaker]}]{breaker}[/]",
                      *cells)
    wan = status["wan"]
    if wan is not None:
        table.add_row("wan", wan["control_url"], f"{status['links']} links, scale "
                      f"{wan['scale']:g}" if wan.get("scale") is not None else "",
                      "", f"{wan['pid']} " + ("[green]✓[/]" if wan["alive"] else "[red]✗[/]"),
                      "", "", "")
    return table


_STATE_COLORS = {"healthy": "green", "degraded": "yellow", "draining": "cyan", "down": "red"}


def _routers_table(routers: list[dict[str, Any]], regions: list[str]) -> Table:
    """Each router's view of each region: state and weight."""
    table = Table(title="geo routers: region state (weight) as each router sees it",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("router", no_wrap=True)
    table.add_column("public url", no_wrap=True)
    for name in regions:
        table.add_column(name, no_wrap=True)
    for router in routers:
        states, weights = router.get("states") or {}, router.get("weights") or {}
        cells = []
        for name in regions:
            state = states.get(name)
            if state is None:
                cells.append("[dim]?[/]")
                continue
            weight = weights.get(name)
            cells.append(f"[{_STATE_COLORS.get(state, 'red')}]{state}[/]"
                         + (f" ({weight})" if weight not in (None, 100) else ""))
        label = router["site"] if router["alive"] else f"{router['site']} [red](not running)[/]"
        table.add_row(label, str(router["url"]), *cells)
    return table


def _ownership_table(status: dict[str, Any]) -> Table:
    table = Table(title=f"ownership (as {status['ownership_source']} sees it)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("home region", "served by", "epoch"):
        table.add_column(col, justify="right" if col == "epoch" else "left")
    for row in status["ownership"]:
        moved = row["serving_region"] != row["home_region"]
        table.add_row(row["home_region"], f"[yellow]{row['serving_region']}[/]" if moved
                      else row["serving_region"], str(row["epoch"]))
    return table


def _lag_table(status: dict[str, Any]) -> Table:
    names = list(status["regions"])
    slo = status["slo_seconds"]
    caption = "rows: from, columns: to" + (f"; SLO {slo:g} s" if slo is not None else "")
    table = Table(title="replication lag (s)", caption=caption, box=box.SIMPLE_HEAD,
                  pad_edge=False)
    table.add_column("from \\ to", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    breached = {(p["from"], p["to"]) for p in status["pairs"] if p["breach"] or p["conflicts"]}
    for src in names:
        cells = []
        for dst in names:
            if src == dst:
                cells.append("[dim]—[/]")
                continue
            value = status["lag_seconds"].get(src, {}).get(dst)
            text = "?" if value is None else f"{value:.2f}"
            if (src, dst) in breached:
                text = f"[red]{text}[/]"
            elif value is not None and slo is not None and value > slo / 2:
                text = f"[yellow]{text}[/]"
            cells.append(text)
        table.add_row(src, *cells)
    return table


@app.command()
def status(data_dir: DataDir = DEFAULT_DATA_DIR,
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
           ) -> None:
    """Regions (ready / degraded, pids), ownership with epochs, the replication lag matrix,
    conflicts and SLO state.

    Exits 1 unless every region is ready, every process alive and every pair within the
    SLO without conflicts.
    """
    try:
        doc = read_cluster(data_dir)
    except ClusterError as exc:
        err_console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    report = collect_status(doc)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        console.print(_regions_table(report))
        if report["routers"]:
            console.print(_routers_table(report["routers"], list(report["regions"])))
        if report["ownership"]:
            console.print(_ownership_table(report))
        if len(report["regions"]) > 1:
            console.print(_lag_table(report))
            conflicts = report["conflicts_total"]
            breaches = [p for p in report["pairs"] if p["breach"]]
            console.print(
                f"conflicts: {'[green]0[/]' if not conflicts else f'[red]{conflicts}[/]'}   "
                f"SLO: " + ("[green]ok[/]" if report["slo_ok"] else
                            f"[red]breached ({len(breaches)} pair(s))[/]"))
            console.print("durability: " + ", ".join(
                f"{n} {d['mode'] or d['recorded_mode'] + ' (recorded)'}"
                + (f" -> {d['buddy'] or d['recorded_buddy']} ({d['sync_state'] or 'absent'})"
                   if (d["mode"] or d["recorded_mode"]) == "regional" else "")
                for n, d in report["durability"].items()))
        owner = doc.get("owner_pid")
        if owner and doc.get("status") == "running" and not psutil.pid_exists(int(owner)):
            console.print(f"[yellow]the foreground `paycluster up` (pid {owner}) is gone; its "
                          "processes are listed above[/]")
        for line in report["problems"]:
            console.print(f"[yellow]- {line}[/]")
        console.print("[green]healthy[/]" if report["healthy"] else "[red]not healthy[/]")
    if not report["healthy"]:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- links


OneWay = Annotated[bool, typer.Option(
    "--one-way", help="only connections that A opens to B (default: both directions)")]


@contextlib.contextmanager
def _wan(data_dir: Path, *regions: str) -> Iterator[WanControl]:
    """The running lab's WAN control client; exits 1 with a message on any problem."""
    try:
        doc = read_cluster(data_dir)
    except ClusterError as exc:
        err_console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    wan = doc.get("wan")
    if not isinstance(wan, dict) or not is_ours(wan):
        err_console.print("[red]no WAN emulator is running for this cluster[/]")
        raise typer.Exit(1)
    known = list(doc.get("regions", {}))
    for name in regions:
        if name not in known:
            err_console.print(f"[red]unknown region {name!r}; regions: {', '.join(known)}[/]")
            raise typer.Exit(1)
    try:
        with WanControl(wan["control_url"]) as control:
            yield control
    except (WanControlError, httpx.HTTPError) as exc:
        err_console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None


def _links_table(links: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("from", "to", "service", "listen", "target", "rtt ms", "jitter ms", "state",
                "conns", "bytes up", "bytes down"):
        table.add_column(col, no_wrap=True,
                         justify="left" if col in ("from", "to", "service", "state") else "right")
    for link in links:
        cut = link.get("cut")
        table.add_row(link["src"], link["dst"], link["service"], str(link["listen_port"]),
                      f"{link['target_host']}:{link['target_port']}", f"{link['rtt_ms']:g}",
                      f"{link['jitter_ms']:g}", f"[red]cut ({cut})[/]" if cut else "[green]up[/]",
                      str(link.get("connections_active", "")), str(link.get("bytes_up", "")),
                      str(link.get("bytes_down", "")))
    return table


@link_app.command("list")
def link_list(data_dir: DataDir = DEFAULT_DATA_DIR,
              as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
              ) -> None:
    """Every WAN link with its live settings, cut state and counters."""
    with _wan(data_dir) as wan:
        links = wan.links()
    if as_json:
        typer.echo(json.dumps(links, indent=2))
    else:
        console.print(_links_table(links, f"{len(links)} WAN links"))


@link_app.command("cut")
def link_cut(a: Annotated[str, typer.Argument(help="region A")],
             b: Annotated[str, typer.Argument(help="region B")],
             mode: Annotated[CutMode, typer.Option(
                 help="blackhole: connections hang (a real partition); reset: they fail at "
                      "once")] = DEFAULT_CUT_MODE,
             one_way: OneWay = False, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Cut every link between A and B (replication, gRPC, Redis)."""
    with _wan(data_dir, a, b) as wan:
        links = wan.cut(a, b, mode=mode.value, both_directions=not one_way)
    console.print(_links_table(links, f"cut {a} {'->' if one_way else '<->'} {b} "
                                      f"({mode.value})"))


@link_app.command("heal")
def link_heal(a: Annotated[str, typer.Argument(help="region A")],
              b: Annotated[str, typer.Argument(help="region B")],
              one_way: OneWay = False, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Heal every link between A and B; held traffic flows again."""
    with _wan(data_dir, a, b) as wan:
        links = wan.heal(a, b, both_directions=not one_way)
    console.print(_links_table(links, f"healed {a} {'->' if one_way else '<->'} {b}"))


@link_app.command("set")
def link_set(a: Annotated[str, typer.Argument(help="region A")],
             b: Annotated[str, typer.Argument(help="region B")],
             rtt_ms: Annotated[float | None, typer.Option(min=0.0, help="round trip")] = None,
             jitter_ms: Annotated[float | None, typer.Option(
                 min=0.0, help="round-trip variation (+- half each way)")] = None,
             one_way: OneWay = False, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Set the round trip and/or jitter of every link between A and B."""
    if rtt_ms is None and jitter_ms is None:
        err_console.print("[red]give --rtt-ms and/or --jitter-ms[/]")
        raise typer.Exit(2)
    with _wan(data_dir, a, b) as wan:
        links = wan.set(a, b, rtt_ms=rtt_ms, jitter_ms=jitter_ms, both_directions=not one_way)
    console.print(_links_table(links, f"set {a} {'->' if one_way else '<->'} {b}"))


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


# --------------------------------------------------------------------------- failover


def failover_targets(cluster: Cluster, via: str) -> tuple[dict[str, Any], list[str]]:
    """The failover guard's view of a lab: every region's API and store, and the quorum
    lock's Redis servers as reached from region `via`."""
    from replication.failover import RegionHandle

    regions = {r.name: RegionHandle(r.name, r.api_url, r.dsn) for r in cluster.regions}
    return regions, [url for _, url in sorted(cluster.lock_urls_of(via).items())]


def _lab(data_dir: Path) -> Cluster:
    """The lab recorded in `data_dir`; exits 1 with a clear message if there is none."""
    try:
        return Cluster.load(data_dir)
    except ClusterError as exc:
        err_console.print(f"[red]no usable lab in {data_dir}:[/] {exc}")
        raise typer.Exit(1) from None


def _failover_lab(data_dir: Path, home: str, to: str
                  ) -> tuple[Cluster, dict[str, Any], list[str]]:
    """The lab in `data_dir` as the failover guard sees it (`failover_targets` via `to`);
    exits with a clear message if there is none or `home`/`to` is not one of its regions."""
    cluster = _lab(data_dir)
    try:
        regions, lock_urls = failover_targets(cluster, to)
    except KeyError as exc:
        err_console.print(f"[red]no usable lab in {data_dir}:[/] {exc}")
        raise typer.Exit(1) from None
    if to not in regions or home not in regions:
        err_console.print(f"[red]unknown region:[/] choose from {', '.join(regions)}")
        raise typer.Exit(1)
    return cluster, regions, lock_urls


def _step_printer(as_json: bool) -> Callable[[Any], None]:
    """Prints each failover step as it finishes (nothing in --json mode)."""
    def show(step: Any) -> None:
        if not as_json:
            console.print(f"  {step.name:<12} {step.seconds * 1000:8.1f} ms  {step.detail}")
    return show


@failover_app.command("planned")
def failover_planned(
        home: Annotated[str, typer.Option("--home", help="home region whose accounts move")],
        to: Annotated[str, typer.Option("--to", help="region that serves them afterwards")],
        data_dir: DataDir = DEFAULT_DATA_DIR,
        catch_up_timeout: Annotated[float, typer.Option(
            min=0.1, help="seconds the takeover region gets to apply the old owner's "
                          "changes up to the ban; then the handover is aborted")] = 10.0,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:
    """Planned handover with RPO 0: lock ownership:<home>, ban writes at the owner, wait
    until every region applied them, restamp, the new owner takes the next epoch. Run it
    again with the old owner as --to to fail back."""
    import asyncio

    from replication.failover import HandoverError, planned_handover

    cluster, regions, lock_urls = _failover_lab(data_dir, home, to)
    show = _step_printer(as_json)
    if not as_json:
        console.print(f"planned handover of {home} to {to}")
    try:
        report = asyncio.run(planned_handover(regions, lock_urls, home, to,
                                              catch_up_timeout=catch_up_timeout, on_step=show,
                                              headers=cluster.auth_headers()))
    except HandoverError as exc:
        if as_json and exc.report is not None:
            typer.echo(json.dumps(exc.report.to_json(), indent=2))
        err_console.print(f"[red]handover failed:[/] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    window = report.unavailable_seconds
    console.print(f"[green]✓[/] {to} serves {home} under epoch {report.new_epoch} (was "
                  f"{report.from_region}, epoch {report.old_epoch}); writes for {home} "
                  f"paused {0.0 if window is None else window * 1000:.0f} ms, total "
                  f"{report.seconds:.2f}s")


@failover_app.command("crash")
def failover_crash(
        home: Annotated[str, typer.Option("--home", help="home region whose owner is lost")],
        to: Annotated[str, typer.Option("--to", help="surviving region that takes over")],
        data_dir: DataDir = DEFAULT_DATA_DIR,
        accept_data_loss: Annotated[bool, typer.Option(
            "--accept-data-loss",
            help="take over even though the lost owner ran in local mode (its "
                 "unreplicated tail is listed for reconciliation on its return)")] = False,
        lease_wait: Annotated[float, typer.Option(
            min=0.0, help="seconds to wait for the lost owner's lease to expire")] = 15.0,
        reason: Annotated[str, typer.Option(help="recorded with the takeover")] = "crash",
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:
    """Forced takeover after a crash or partition of --home's owner: cut its stream off
    every survivor, align them, restamp, and --to acquires the ownership lease once the
    old one expired (replication.failover.crash_takeover). Bring the old owner back with
    `paycluster failover return`."""
    import asyncio

    from replication.failover import HandoverError, crash_takeover

    cluster, regions, _ = _failover_lab(data_dir, home, to)
    show = _step_printer(as_json)
    try:
        report = asyncio.run(crash_takeover(regions, home, to, headers=cluster.auth_headers(),
                                            accept_data_loss=accept_data_loss,
                                            lease_wait=lease_wait, reason=reason,
                                            on_step=show))
    except HandoverError as exc:
        err_console.print(f"[red]takeover refused:[/] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    console.print(f"[green]✓[/] {to} serves {home} under epoch {report.new_epoch} (forced; "
                  f"{report.from_region} ran in {report.durability} mode), "
                  f"{report.seconds:.2f}s")


@failover_app.command("return")
def failover_return(
        region: Annotated[str, typer.Option("--region", help="the region coming back")],
        home: Annotated[str | None, typer.Option(
            "--home", help="the home region it lost (default: its own)")] = None,
        data_dir: DataDir = DEFAULT_DATA_DIR,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:
    """Bring back a region that lost a forced takeover: list its lost tail in
    reconciliation_items (never applied), then reconnect it if the tail holds nothing
    the survivors lack, else rebuild it from a donor (replication.reconcile). Fail back
    afterwards with `paycluster failover planned`."""
    from replication.failover import RegionHandle
    from replication.reconcile import (
        ReconcileError,
        lost_tail,
        reconnect_region,
        rejoin_region,
        start_store,
    )

    home = home or region
    cluster = _lab(data_dir)
    try:
        start_store(cluster, region)
    except KeyError as exc:
        err_console.print(f"[red]no usable lab in {data_dir}:[/] {exc}")
        raise typer.Exit(1) from None
    handles = {r.name: RegionHandle(r.name, r.api_url, r.dsn) for r in cluster.regions}
    survivors = {n: h for n, h in handles.items() if n != region}
    tail = lost_tail(handles[region], survivors, home)
    how = "reconnected"
    try:
        node = cluster.region(region).node
        if node is None or not node.is_running():
            raise ReconcileError("its node is down")
        reconnect_region(handles[region], survivors, home, tail=tail)
    except ReconcileError:
        rejoin_region(cluster, region)
        how = "rebuilt from a donor"
    if as_json:
        typer.echo(json.dumps({**tail.to_json(), "how": how}, indent=2))
        return
    console.print(f"{region}'s lost tail: {tail.count} payments {tail.amount_by_currency}, "
                  f"{len(tail.journals)} other journals, {len(tail.orphan_credits)} orphan "
                  f"credits {tail.orphan_amount_by_currency or ''} (parked in suspense by "
                  f"the regions that paid them), {tail.recorded} item(s) listed for "
                  f"reconciliation; {how}")


@durability_app.command("set")
def durability_set(
        region: Annotated[str, typer.Argument(help="region whose commits change")],
        mode: Annotated[DurabilityMode, typer.Argument(
            help="local (asynchronous) or regional (every commit also at the buddy)")],
        buddy: Annotated[str | None, typer.Option(
            "--buddy", help="regional: the region that has every commit at ack time")] = None,
        data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Change a region's durability mode at runtime (ALTER SYSTEM + reload, no restart).

    `regional` without --buddy: the buddy recorded for the region, else its nearest
    region. `local` never waits for the buddy: it is the way out while the buddy is
    unreachable (commits in regional mode wait for it)."""
    import psycopg

    from cluster.durability import default_buddy
    from replication.durability import set_durability

    try:
        cluster = Cluster.load(data_dir)
        dsn = cluster.region(region).dsn
        # Back to local: the old buddy's subscription may stop committing synchronously.
        old_buddy = (cluster.durability.get(region) or {}).get("buddy")
        if mode == "regional" and buddy is None:
            buddy = old_buddy if old_buddy in cluster.names else default_buddy(region,
                                                                               cluster.names)
        buddy_dsn = (cluster.region(buddy).dsn if buddy is not None else
                     cluster.region(old_buddy).dsn if mode == "local" and old_buddy in
                     cluster.names else None)
        state = set_durability(dsn, region, mode, buddy, buddy_dsn)
        # Recorded, so `status`, `up`'s monitor and a restart of the data dir keep it.
        cluster.durability[region] = {"mode": state.mode, "buddy": state.buddy}
        cluster.write()
    except (ClusterError, KeyError, ValueError, TimeoutError, psycopg.Error) as exc:
        err_console.print(f"[red]could not set durability:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"[green]✓[/] {region}: {state.mode}"
                  + (f", buddy {state.buddy} ({state.standby}: {state.sync_state})"
                     if state.mode == "regional" else ""))


@durability_app.command("show")
def durability_show(data_dir: DataDir = DEFAULT_DATA_DIR,
                    as_json: Annotated[bool, typer.Option("--json",
                                                          help="machine-readable")] = False,
                    ) -> None:
    """Every region's durability mode, buddy and the buddy's sync state."""
    import psycopg

    from replication.durability import durability

    try:
        cluster = Cluster.load(data_dir)
        states = [durability(r.dsn, r.name, cluster.names) for r in cluster.regions]
    except (ClusterError, psycopg.Error) as exc:
        err_console.print(f"[red]cannot read durability:[/] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps([s.to_json() for s in states], indent=2))
        return
    table = Table(title="durability", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("region", "mode", "buddy", "standby", "sync state"):
        table.add_column(column)
    for st in states:
        table.add_row(st.region, st.mode, st.buddy or "-", st.standby or "-",
                      st.sync_state or "-")
    console.print(table)


reconcile_app = typer.Typer(help="Settle the items a lost tail left for reconciliation "
                                 "(/v1/admin/reconciliation).", no_args_is_help=True)
app.add_typer(reconcile_app, name="reconcile")
# The channel's daily statement against a region's ledger (issue #15).
reconcile_app.command("statement")(reconcile_statement)


def reconciliation_listings(cluster: Cluster, client: httpx.Client
                            ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(region, GET /v1/admin/reconciliation) of each region that answers, in lab order."""
    for region in cluster.regions:
        with contextlib.suppress(httpx.HTTPError):
            resp = client.get(f"{region.api_url}/v1/admin/reconciliation",
                              headers=cluster.auth_headers())
            if resp.status_code == 200:
                yield region.name, resp.json()


@reconcile_app.command("list")
def reconcile_list(data_dir: DataDir = DEFAULT_DATA_DIR,
                   as_json: Annotated[bool, typer.Option("--json", help="machine-readable")]
                   = False) -> None:
    """Every listed item with its resolution (as the first answering region has them)
    and the open items per kind and currency."""
    cluster = _lab(data_dir)
    with httpx.Client(timeout=10) as client:
        region, doc = next(reconciliation_listings(cluster, client), (None, None))
    if doc is None:
        err_console.print("[red]no region answered[/]")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    table = Table(title=f"reconciliation items (as {region} has them)", box=box.SIMPLE)
    for col in ("home", "epoch", "item", "kind", "amount", "resolved by region", "resolution"):
        table.add_column(col)
    for item in doc["items"]:
        done = item.get("resolution")
        table.add_row(item["home_region"], str(item["takeover_epoch"]), item["item_id"],
                      item["item_kind"], f"{item['amount']} {item['currency']}",
                      str(item.get("resolver_region")),
                      f"{done['resolution']}: {done['note']}" if done else "[yellow]open[/]")
    console.print(table)
    for group in doc["summary"]["open_by_kind_and_currency"]:
        console.print(f"open {group['item_kind']}: {group['count']} item(s), "
                      f"{group['amount']} {group['currency']}")


@reconcile_app.command("resolve")
def reconcile_resolve(
        home: Annotated[str, typer.Option("--home", help="the item's home region")],
        epoch: Annotated[int, typer.Option("--epoch", help="the takeover epoch it is under")],
        item: Annotated[str, typer.Option("--item", help="the item id")],
        resolution: Annotated[Resolution, typer.Option(
            "--resolution", help="how it was settled: acknowledge (outside the system), "
                                 "claw_back or write_off")],
        note: Annotated[str, typer.Option("--note", help="how it was settled")],
        data_dir: DataDir = DEFAULT_DATA_DIR,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:
    """Settle one item, at the one region allowed to (the credit region of an orphan
    credit, else the region serving its home): once per item, cluster-wide."""
    cluster = _lab(data_dir)
    body = {"home_region": home, "takeover_epoch": epoch, "item_id": item,
            "resolution": resolution, "note": note}
    with httpx.Client(timeout=30) as client:
        resolver = next((i.get("resolver_region") for _, doc in
                         reconciliation_listings(cluster, client) for i in doc["items"]
                         if (i["home_region"], i["takeover_epoch"], i["item_id"])
                         == (home, epoch, item)), None)
        # Any region forwards it to the resolver; asking that one saves the hop.
        target = resolver if resolver in cluster.names else cluster.names[0]
        resp = client.post(f"{cluster.region(target).api_url}/v1/admin/reconciliation/resolve",
                           json=body, headers=cluster.auth_headers())
    if resp.status_code != 201:
        err = resp.json().get("error", {}) if resp.headers.get(
            "content-type", "").startswith("application/json") else {}
        err_console.print(f"[red]refused by {target} (HTTP {resp.status_code} "
                          f"{err.get('code', '')}):[/] {err.get('message', resp.text)}")
        raise typer.Exit(1)
    done = resp.json()
    if as_json:
        typer.echo(json.dumps(done, indent=2))
        return
    moved = f", journal {done['journal_id']} ({done['amount']} {done['currency']})" \
        if done["journal_id"] else ""
    console.print(f"[green]✓[/] {done['item_kind']} {item} resolved: {done['resolution']} "
                  f"at {done['region']}{moved}")


# --------------------------------------------------------------------------- routers


def _running_routers(data_dir: Path) -> list[dict[str, Any]]:
    """cluster.json's routers that are running; exits 1 with a message if there are none."""
    try:
        doc = read_cluster(data_dir)
    except ClusterError as exc:
        err_console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    routers = [r for r in doc.get("routers") or [] if isinstance(r, dict) and is_ours(r)]
    if not routers:
        err_console.print("[red]no geo router is running for this cluster (start the lab "
                          "with `paycluster up --routers 1`)[/]")
        raise typer.Exit(1)
    return routers


def _on_every_router(data_dir: Path, change: Callable[[RouterAdmin], dict[str, Any]],
                     what: str) -> None:
    """Apply one operator change through every running router's admin API.

    Each router applies it at once and writes the shared overrides file (which the others
    would also pick up within a probe interval); telling each one directly means the
    command returns only once every router acts on it. Exits 1 if any router refused.
    """
    failed = False
    for router in _running_routers(data_dir):
        try:
            with RouterAdmin(router["admin_url"]) as admin:
                view = change(admin)
        except (RouterAdminError, httpx.HTTPError) as exc:
            err_console.print(f"[red]router ({router['site']}): {exc}[/]")
            failed = True
            continue
        state = view.get("state", "?")
        console.print(f"[green]✓[/] router ({router['site']}): {what}; {view.get('name')} is "
                      f"[{_STATE_COLORS.get(state, 'red')}]{state}[/], weight "
                      f"{view.get('weight')}")
    if failed:
        raise typer.Exit(1)


@router_app.command("status")
def router_status(data_dir: DataDir = DEFAULT_DATA_DIR,
                  as_json: Annotated[bool, typer.Option("--json", help="machine-readable")]
                  = False) -> None:
    """Every router's view: each region's state, weight, drain flag and latest probes."""
    views = []
    for router in _running_routers(data_dir):
        try:
            with RouterAdmin(router["admin_url"]) as admin:
                views.append({"site": router["site"], "url": router["url"],
                              "admin_url": router["admin_url"], **admin.regions(),
                              "events": admin.events()[-10:]})
        except (RouterAdminError, httpx.HTTPError) as exc:
            err_console.print(f"[red]router ({router['site']}): {exc}[/]")
            raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(views, indent=2))
        return
    for view in views:
        probe = view["probe"]
        table = Table(title=f"router ({view['site']}) at {view['url']}; probes every "
                            f"{probe['interval_seconds']:g}s, down after {probe['fall']} "
                            f"failures, back after {probe['rise']} successes",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("region", "place", "endpoint", "state", "weight", "last probe",
                    "ok streak", "fail streak"):
            table.add_column(col, no_wrap=True,
                             justify="right" if "streak" in col or col == "weight" else "left")
        for region in view["regions"]:
            last = region.get("last_probe") or {}
            probe_text = (f"{last.get('status')} {last.get('ms')} ms" if last.get("ok")
                          else f"[red]{last.get('detail') or last.get('status')}[/]"
                          if last else "-")
            state = region["state"]
            table.add_row(region["name"], region.get("place") or "", region["endpoint"],
                          f"[{_STATE_COLORS.get(state, 'red')}]{state}[/]",
                          str(region["weight"]), probe_text, str(region.get("ok_streak", "")),
                          str(region.get("fail_streak", "")))
        console.print(table)
        for event in view["events"]:
            when = time.strftime("%H:%M:%S", time.localtime(event["at"]))
            console.print(f"  [dim]{when}[/] {event['region']}: {event['from'] or '-'} -> "
                          f"{event['to']} ({event['reason']})")


@router_app.command("drain")
def router_drain(region: RegionArg, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Send no new requests to REGION; requests already there finish normally."""
    _on_every_router(data_dir, lambda admin: admin.drain(region), f"drained {region}")


@router_app.command("undrain")
def router_undrain(region: RegionArg, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Route to REGION again (if its probes say it is up)."""
    _on_every_router(data_dir, lambda admin: admin.undrain(region), f"undrained {region}")


@router_app.command("weight")
def router_weight(region: RegionArg,
                  weight: Annotated[int | None, typer.Argument(
                      min=0, max=100, help="0-100: the share of its clients REGION keeps; the "
                                           "rest go to the next nearest region")] = None,
                  reset: Annotated[bool, typer.Option(
                      "--reset", help="back to the catalog's weight")] = False,
                  data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Shift traffic gradually: REGION keeps WEIGHT percent of the clients it is nearest
    to (100 = all, 0 = only if nothing else is routable)."""
    if (weight is None) == (not reset):
        err_console.print("[red]give a WEIGHT (0-100) or --reset[/]")
        raise typer.Exit(2)
    _on_every_router(data_dir, lambda admin: admin.set_weight(region, weight),
                     f"weight of {region} {'reset' if reset else f'set to {weight}'}")


@router_app.command("resolve")
def router_resolve(client_region: Annotated[str | None, typer.Option(
                       help="the client's region (as X-Client-Region)")] = None,
                   geo: Annotated[str | None, typer.Option(
                       help="the client's 'lat,lon' (as X-Client-Geo)")] = None,
                   client_ip: Annotated[str | None, typer.Option(
                       help="the client's address (looked up in the CIDR table)")] = None,
                   id: Annotated[str | None, typer.Option(
                       "--id", help="an account or payment id to write to (owner "
                                    "preference)")] = None,
                   data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Where the first router would send a client (`GET /v1/resolve`), as JSON."""
    router = _running_routers(data_dir)[0]
    try:
        answer = resolve(router["url"], client_region=client_region, geo=geo,
                         client_ip=client_ip, id=id)
    except (RouterAdminError, httpx.HTTPError) as exc:
        err_console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    typer.echo(json.dumps(answer, indent=2))


# --------------------------------------------------------------------------- demo


@app.command()
def demo(data_dir: Annotated[Path | None, typer.Option(
            "--data-dir", "-d", help="where to run the lab (default: a temp dir, removed "
                                     "afterwards)")] = None,
         regions: RegionCount = 3,
         wan_scale: WanScale = 1.0,
         payments: Annotated[int, typer.Option(help="payments to run", min=1)] = 600,
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
