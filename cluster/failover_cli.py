"""`paycluster failover ...`, `durability ...` and `reconcile ...`: moving a home region's
ownership, each region's durability mode, and settling what a lost tail left."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich import box
from rich.table import Table

from cluster.cli_options import (
    DEFAULT_DATA_DIR,
    AsJson,
    DataDir,
    DurabilityMode,
    Resolution,
)
from cluster.console import console, err_console
from cluster.lab import (
    Cluster,
    ClusterError,
)
from cluster.statement_cli import reconcile_statement

failover_app = typer.Typer(help="Move the ownership of a home region between regions "
                                "(the failover guard).", no_args_is_help=True)

durability_app = typer.Typer(help="Durability mode per region: local (asynchronous) or "
                                  "regional (a buddy region's subscription is a synchronous "
                                  "standby).", no_args_is_help=True)

reconcile_app = typer.Typer(help="Settle the items a lost tail left for reconciliation "
                                 "(/v1/admin/reconciliation).", no_args_is_help=True)
# The channel's daily statement against a region's ledger (issue #15).
reconcile_app.command("statement")(reconcile_statement)


# --------------------------------------------------------------------------- failover


def failover_targets(cluster: Cluster, via: str) -> tuple[dict[str, Any], list[str]]:
    """The failover guard's view of a lab: every region's API and store, and the quorum
    lock's Redis servers as reached from region `via`."""
    return cluster.region_handles(), [url for _, url in sorted(cluster.lock_urls_of(via).items())]


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
        as_json: AsJson = False,
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
        as_json: AsJson = False,
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
        region: Annotated[str, typer.Option("--region", "-r", help="the region coming back")],
        home: Annotated[str | None, typer.Option(
            "--home", help="the home region it lost (default: its own)")] = None,
        data_dir: DataDir = DEFAULT_DATA_DIR,
        as_json: AsJson = False,
) -> None:
    """Bring back a region that lost a forced takeover: list its lost tail in
    reconciliation_items (never applied), then reconnect it if the tail holds nothing
    the survivors lack, else rebuild it from a donor (replication.reconcile). Fail back
    afterwards with `paycluster failover planned`."""
    from cluster.rejoin import rejoin_region, start_store
    from replication.reconcile import ReconcileError, lost_tail, reconnect_region

    home = home or region
    cluster = _lab(data_dir)
    try:
        start_store(cluster, region)
    except KeyError as exc:
        err_console.print(f"[red]no usable lab in {data_dir}:[/] {exc}")
        raise typer.Exit(1) from None
    handles = cluster.region_handles()
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
                   as_json: AsJson
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
        as_json: AsJson = False,
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
