"""What every benchmark shares around its measurement: the one `BenchError`, and
running a measurement so that Ctrl-C, SIGTERM and SIGHUP stop it cleanly (the `finally`
blocks that stop the servers it started run) and its failures end in an exit code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import httpx
import psycopg
import typer
from rich.console import Console

from cluster.cli_options import HELP_CONTEXT
from cluster.console import Stop, terminate_as_interrupt
from cluster.errors import LabError

ApiKey = Annotated[str | None, typer.Option(
    envvar="PAYCLUSTER_API_KEY", help="admin API key for --api-url; a self-started lab's own "
                                      "key otherwise", rich_help_panel="target")]
"""--api-key of a benchmark that measures a running node or starts its own lab."""


class BenchError(RuntimeError):
    """A benchmark cannot run or finish (setup failed, pgbench failed, a mode did not take,
    a path answered errors only...)."""


FAILURES: tuple[type[BaseException], ...] = (BenchError, LabError, TimeoutError,
                                              httpx.HTTPError, psycopg.Error)
"""What a benchmark reports as "benchmark failed" (exit 1) rather than a traceback."""


def guarded(measure: Callable[[], int], console: Console) -> int:
    """Run `measure` with SIGTERM/SIGHUP turned into an exception; its exit code, 1 on a
    failure, 130 when interrupted."""
    with terminate_as_interrupt():
        try:
            return measure()
        except FAILURES as exc:
            console.print(f"[red]benchmark failed:[/] {exc}")
            return 1
        except (KeyboardInterrupt, Stop):
            console.print("[yellow]interrupted[/]")
            return 130


def usage(message: str) -> typer.BadParameter:
    """A usage error of a benchmark's options (exit 2 with the command's usage line)."""
    return typer.BadParameter(message)


def bench_app() -> typer.Typer:
    """A benchmark's typer app (one command): `-h`/`--help` as everywhere in `paycluster`,
    no shell-completion options."""
    return typer.Typer(add_completion=False, context_settings=HELP_CONTEXT)
