"""`paycluster status`: every region's readiness and pids, ownership with epochs, the
replication lag matrix against the SLO, the routers' view and durability."""

from __future__ import annotations

import json
from typing import Any

import httpx
import psutil
import typer
from rich import box
from rich.table import Table

from cluster.cli_options import (
    DEFAULT_DATA_DIR,
    AsJson,
    DataDir,
)
from cluster.console import console, err_console
from cluster.lab import (
    ClusterError,
    read_cluster,
)
from cluster.servers import is_ours

KINDS = ("node", "postgres", "redis", "nats")
"""The servers of a region that cluster.json lists with a pid."""


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
            for kind in KINDS if isinstance(region.get(kind), dict)}
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
    for col in ("region", "api", "state", "channel", *KINDS):
        table.add_column(col, no_wrap=True, justify="right" if col in KINDS else "left")
    colors = {"ready": "green", "degraded": "yellow"}
    for name, probe in status["regions"].items():
        state = probe["state"]
        label = f"[{colors.get(state, 'red')}]{state}[/]"
        if probe["stale_pairs"]:
            label += f" [yellow](stale: {', '.join(probe['stale_pairs'])})[/]"
        cells = []
        for kind in KINDS:
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


STATE_COLORS = {"healthy": "green", "degraded": "yellow", "draining": "cyan", "down": "red"}


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
            cells.append(f"[{STATE_COLORS.get(state, 'red')}]{state}[/]"
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


def status(data_dir: DataDir = DEFAULT_DATA_DIR,
           as_json: AsJson = False,
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
