"""The failover drill's report: a rich table for the terminal, `report.json`, `report.md`
and `timeline.png` (success rate, latency p50/p99 and max replication lag per second,
with the fault and every later step marked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from cluster.drill.run import DrillResult


def _s(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.2f} {unit}"


def headline(result: DrillResult) -> list[tuple[str, str]]:
    """The figures that matter, as (what, value) rows."""
    cfg = result.config
    rows: list[tuple[str, str]] = [
        ("drill", f"{cfg.kind} of {cfg.region} -> {result.takeover}, durability "
                  f"{result.durability}"),
        ("workload", f"{result.workload.get('payments', 0)} payments "
                     f"({result.workload.get('focus_payments', 0)} by payers homed in "
                     f"{cfg.region}), {result.workload.get('attempts', 0)} attempts, "
                     f"{result.workload.get('rate_per_s')} /s over {result.seconds:.1f} s"),
    ]
    for d in result.disruptions:
        rows.append((f"RTO after {d.event} (t={d.at:.1f}s)",
                     f"first success {_s(d.rto_first)}, stable (>95%) {_s(d.rto_stable)}; "
                     f"{d.failed}/{d.attempts} attempts failed, longest gap without an "
                     f"ack {_s(d.longest_ack_gap)}, max latency {_s(d.max_latency)}"))
    if result.loss is not None:
        lo = result.loss
        rows.append(("RPO", f"{lo.rpo_count} acknowledged payments missing "
                            f"({lo.missing_amount} minor units) of {lo.acknowledged} "
                            f"({lo.acknowledged_amount})"))
        rows.append(("duplicates", f"{lo.duplicates} ({len(lo.duplicate_keys)} keys charged "
                                   f"twice, {len(lo.client_saw_two_ids)} answered with two "
                                   f"ids); {lo.unacknowledged_stored} stored but never "
                                   f"acknowledged"))
    rows.append(("client errors", ", ".join(f"{k} x{v}" for k, v in
                                            result.errors_by_code.items()) or "none"))
    lag = result.max_lag
    rows.append(("max replication lag",
                 f"{_s(lag.get('seconds'))} ({lag.get('pair')}); without "
                 f"{cfg.region}'s pairs {_s(lag.get('excluding_region_seconds'))}"))
    if result.lost_tail is not None:
        rows.append(("lost tail (reconciliation)", f"{len(result.lost_tail)} payments, "
                     f"{sum(int(p.get('amount', 0)) for p in result.lost_tail)} minor units"))
        orphans = (result.lost_tail_record or {}).get("orphan_credits") or []
        rows.append(("orphan credits (parked in suspense)", f"{len(orphans)}, "
                     f"{sum(int(c.get('amount', 0)) for c in orphans)} minor units"))
    if result.fence is not None:
        rows.append(("fence", result.fence.get("summary", "")))
    rows.append(("converged", "-" if result.converged_after is None
                 else f"{result.converged_after:.1f} s after the workload stopped"))
    return rows


def table(result: DrillResult) -> Table:
    """The terminal summary: headline figures, then the checks."""
    t = Table(title=f"failover drill {result.run_id}: "
                    f"{'[green]PASS[/]' if result.ok else '[red]FAIL[/]'}",
              box=box.SIMPLE_HEAD, pad_edge=False, show_lines=False)
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("result")
    for what, value in headline(result):
        t.add_row(what, value)
    for c in result.checks:
        t.add_row(("[green]✓[/] " if c.ok else "[red]✗[/] ") + c.name, c.detail)
    return t


def print_report(result: DrillResult, console: Console | None = None) -> None:
    """Print the summary table and the event log."""
    console = console or Console()
    console.print(table(result))
    events = Table(title="events", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("t (s)", "event", "detail"):
        events.add_column(column)
    for e in result.events:
        events.add_row(f"{e.at:.2f}", e.name, e.detail)
    console.print(events)


def command(result: DrillResult) -> str:
    """The command line that runs this drill again (on the same lab)."""
    cfg = result.config
    parts = [f"paycluster drill {cfg.kind} --region {cfg.region}",
             f"--duration {cfg.duration:g} --rate {cfg.rate:g}",
             f"--data-dir {result.data_dir}"]
    if cfg.durability:
        parts.append(f"--durability {cfg.durability}")
    if cfg.to:
        parts.append(f"--to {cfg.to}")
    if cfg.drain:
        parts.append("--drain")
    if cfg.kind == "partition":
        parts.append(f"--cut-mode {cfg.cut_mode}")
    if cfg.tail_lag:
        parts.append(f"--tail-lag {cfg.tail_lag:g}")
    return " ".join(parts)


def markdown(result: DrillResult) -> str:
    """report.md."""
    cfg = result.config
    lines = [f"# Failover drill: {cfg.kind} of {cfg.region} "
             f"({'PASS' if result.ok else 'FAIL'})", "",
             f"Run `{result.run_id}`, started {result.started_at}, lab `{result.data_dir}`, "
             f"regions {', '.join(result.regions)}. Command: `{command(result)}`.", "",
             "| what | result |", "|---|---|"]
    lines += [f"| {w} | {v} |" for w, v in headline(result)]
    lines += ["", "## Checks", "", "| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {'yes' if c.ok else '**no**'} | {c.detail} |"
              for c in result.checks]
    lines += ["", "## Events", "", "| t (s) | event | detail |", "|---|---|---|"]
    lines += [f"| {e.at:.2f} | {e.name} | {e.detail} |" for e in result.events]
    lines += ["", "## Errors seen by clients", ""]
    lines += [f"- `{k}`: {v}" for k, v in result.errors_by_code.items()] or ["- none"]
    broken = [f for f in result.findings if not f.ok]
    lines += ["", "## Invariants", "",
              f"{len(result.findings) - len(broken)} of {len(result.findings)} hold."]
    lines += [f"- **{f.region}: {f.name}**: {f.detail}" for f in broken]
    if result.lost_tail:
        lines += ["", "## Lost tail listed for reconciliation", "",
                  "| payment | amount |", "|---|---|"]
        lines += [f"| {p.get('id')} | {p.get('amount')} |" for p in result.lost_tail]
    lines += ["", "Definitions: RTO `first` = from the event until the first acknowledged "
              "write (for payers homed in the drilled region, through the router) sent "
              "after writes had started failing; `stable` = until the point after which "
              "more than 95 % of their attempts were answered in every second. RPO = "
              "acknowledged payments missing from the converged final state.",
              "", "![timeline](timeline.png)", ""]
    return "\n".join(lines)


def plot_timeline(result: DrillResult, path: Path) -> None:
    """timeline.png: success rate, latency p50/p99 and max lag per second; the fault and
    every later disruptive step as vertical lines, other events dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = result.timeline
    t = [s["t"] for s in tl]
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    ax1, ax2, ax3 = axes
    step = {"drawstyle": "steps-post"}
    ax1.plot(t, [_pct(s["success_rate"]) for s in tl], label="all clients", color="tab:blue",
             **step)
    ax1.plot(t, [_pct(s["focus_success_rate"]) for s in tl],
             label=f"payers homed in {result.config.region}", color="tab:red", **step)
    width = tl[0]["width"] if tl else 1.0
    ax1.set_ylabel(f"answered per {width:g} s (%)")
    ax1.set_ylim(-5, 105)
    ax1.legend(loc="lower left", fontsize=8)
    ax2.plot(t, [s["p50_ms"] for s in tl], label="p50", color="tab:green", **step)
    ax2.plot(t, [s["p99_ms"] for s in tl], label="p99", color="tab:orange", **step)
    ax2.set_ylabel("latency (ms)")
    ax2.set_yscale("symlog", linthresh=100)
    ax2.legend(loc="upper left", fontsize=8)
    ax3.plot(t, [s["max_lag_s"] for s in tl], color="tab:purple", label="every pair", **step)
    ax3.plot(t, [s.get("max_lag_others_s") for s in tl], color="tab:gray",
             label=f"pairs without {result.config.region}", **step)
    ax3.legend(loc="upper left", fontsize=8)
    ax3.set_ylabel("max replication lag (s)")
    ax3.set_ylim(bottom=0)
    ax3.set_xlabel("seconds since the workload started")
    for e in result.events:
        # The fault and the steps users feel; not every step of the guard.
        stage = e.name.rsplit(": ", 1)[-1] if ": " in e.name else None
        if e.name in ("workload", "workload stopped") or stage not in (None, "ban", "take"):
            continue
        style = {"color": "red", "linestyle": "-"} if e.disruptive else \
            {"color": "gray", "linestyle": ":"}
        for ax in axes:
            ax.axvline(e.at, linewidth=1, **style)
        if e.disruptive or stage is not None or e.name in ("heal", "rejoined", "crashed"):
            ax1.annotate(e.name, (e.at, 102), fontsize=7, rotation=90, va="top",
                         ha="right", color=style["color"])
    fig.suptitle(f"{result.config.kind} drill of {result.config.region} "
                 f"({result.durability}): {'PASS' if result.ok else 'FAIL'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pct(rate: float | None) -> float | None:
    return None if rate is None else rate * 100


def write_report(result: DrillResult, directory: Path) -> dict[str, Path]:
    """Write report.json, report.md, timeline.png and attempts.jsonl under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "report.json", "md": directory / "report.md",
             "png": directory / "timeline.png", "attempts": directory / "attempts.jsonl"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(result))
    plot_timeline(result, paths["png"])
    with paths["attempts"].open("w") as fh:
        for a in result.attempts:
            fh.write(json.dumps(_attempt_json(a)) + "\n")
    return paths


def _attempt_json(a: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(a)
