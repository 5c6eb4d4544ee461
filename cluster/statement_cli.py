"""`paycluster reconcile statement`: match the channel's statement against a region's
ledger and print the report (terminal, JSON, markdown).

    paycluster reconcile statement --region R [--file F | --day YYYY-MM-DD]
                                   [--json PATH] [--markdown PATH] [--data-dir DIR]

The region's node does the matching (POST /v1/admin/channel/statement): it alone may
settle its operations and list items for its home regions. Without --file the node
fetches the day's statement from the channel itself. Exit status 0 when every row
matched or was fixed, 2 when differences were listed for an operator.
"""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from cluster.cli_options import DEFAULT_DATA_DIR, DataDir
from region_node.statement_recon import to_markdown


def run_statement(api_url: str, headers: dict[str, str], csv_text: str | None,
                  day: date | None, timeout: float = 120.0) -> dict[str, Any]:
    """Ask the node at `api_url` to reconcile `csv_text` (or the channel's statement of
    `day`); returns its report. RuntimeError with the node's error if it refuses."""
    body: dict[str, Any] = {}
    if csv_text is not None:
        body["csv"] = csv_text
    if day is not None:
        body["day"] = day.isoformat()
    resp = httpx.post(f"{api_url}/v1/admin/channel/statement", json=body, headers=headers,
                      timeout=timeout)
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:500]}")
    report: dict[str, Any] = resp.json()
    return report


def report_tables(report: dict[str, Any]) -> list[Table]:
    """The report for a terminal: the summary, then every difference."""
    summary = Table(title=f"statement {report['day']} at {report['region']} "
                          f"({report['statement_rows']} rows, "
                          f"{report['rows_of_other_regions']} of other regions)",
                    box=box.SIMPLE_HEAD)
    summary.add_column("category")
    summary.add_column("count", justify="right")
    for category, n in report["summary"].items():
        summary.add_row(category, str(n))
    fees = ", ".join(f"{v} {k}" for k, v in sorted(report["fees_posted"].items())) or "none"
    summary.add_row("fees posted", fees)
    summary.add_row("items new / already listed",
                    f"{report['items_new']} / {report['items_already_listed']}")
    diffs = Table(title="differences (reconciliation items)", box=box.SIMPLE_HEAD)
    for col in ("reference", "category", "ours", "channel", "item"):
        diffs.add_column(col)
    for d in report["differences"]:
        ours, theirs, item = d.get("ours") or {}, d.get("channel") or {}, d.get("item") or {}
        diffs.add_row(d["reference"], d["category"],
                      f"{ours.get('status', '-')} {ours.get('amount', '')}",
                      f"{theirs.get('status', '-')} {theirs.get('amount', '')}",
                      f"{item.get('item_kind', '')}"
                      + (" (known)" if item.get("already_listed") else ""))
    return [summary, diffs] if report["differences"] else [summary]


def reconcile_statement(
        region: Annotated[str, typer.Option("--region", "-r", help="the region whose ledger")],
        file: Annotated[Path | None, typer.Option(
            "--file", help="the statement CSV; default: fetched from the channel")] = None,
        day: Annotated[str | None, typer.Option(
            "--day", help="statement day YYYY-MM-DD (default: from the file name, else "
                          "yesterday)")] = None,
        json_out: Annotated[Path | None, typer.Option("--json", help="write the report")]
        = None,
        markdown_out: Annotated[Path | None, typer.Option(
            "--markdown", help="write the report as markdown")] = None,
        data_dir: DataDir = DEFAULT_DATA_DIR,
        api_url: Annotated[str | None, typer.Option(
            "--api-url", help="a node's URL instead of the lab's (with --key)",
            hidden=True)] = None,
        key: Annotated[str | None, typer.Option("--key", hidden=True)] = None,
) -> None:
    """Match the channel's statement against REGION's operations: matched, fixed (the
    channel booked it, we still waited: settled once), missing here, missing at the
    channel, amount and status mismatches (listed as reconciliation items); fees posted
    once to the fees account."""
    console = Console()
    if api_url is None:
        from cluster.lab import Cluster

        cluster = Cluster.load(data_dir)
        api_url, headers = cluster.region(region).api_url, cluster.auth_headers()
    else:
        headers = {"Authorization": f"Bearer {key}"}
    if day is None and file is not None:
        found = re.search(r"\d{4}-\d{2}-\d{2}", file.name)
        day = found.group(0) if found else None
    try:
        report = run_statement(api_url, headers, file.read_text() if file else None,
                               date.fromisoformat(day) if day else None)
    except (RuntimeError, httpx.HTTPError) as exc:
        Console(stderr=True).print(f"[red]reconciliation refused:[/] {exc}")
        raise typer.Exit(1) from None
    for table in report_tables(report):
        console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
    if markdown_out is not None:
        markdown_out.write_text(to_markdown(report))
    if report["differences"]:
        raise typer.Exit(2)
