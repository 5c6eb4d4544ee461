"""`paycluster link ...` and `paycluster router ...`: the lab's emulated WAN links and its
geo routers, changed on the running lab."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich import box
from rich.table import Table

from cluster.cli_options import (
    DEFAULT_CUT_MODE,
    DEFAULT_DATA_DIR,
    AsJson,
    CutMode,
    DataDir,
    RegionArg,
)
from cluster.console import console, err_console
from cluster.lab import (
    ClusterError,
    read_cluster,
)
from cluster.servers import is_ours
from cluster.status_cli import STATE_COLORS
from cluster.wan import WanControl, WanControlError
from geo_router.client import RouterAdmin, RouterAdminError, resolve

link_app = typer.Typer(help="Inspect and change the emulated WAN links between regions.",
                       no_args_is_help=True)

router_app = typer.Typer(help="Operate the lab's geo routers: state, drain, weights, resolve. "
                              "Changes go to every router the lab runs.",
                         no_args_is_help=True)


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
              as_json: AsJson = False,
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
                      f"[{STATE_COLORS.get(state, 'red')}]{state}[/], weight "
                      f"{view.get('weight')}")
    if failed:
        raise typer.Exit(1)


@router_app.command("status")
def router_status(data_dir: DataDir = DEFAULT_DATA_DIR,
                  as_json: AsJson
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
                          f"[{STATE_COLORS.get(state, 'red')}]{state}[/]",
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
