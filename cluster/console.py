"""Console and signal helpers shared by every command line of the project.

`paycluster` (cluster/cli.py and its parts), the drill CLI and every benchmark print
through `make_console` and stop their processes through the same signal handling:
SIGTERM/SIGHUP become an exception (`Stop`) so `finally` blocks stop what was started,
and `shielded` ignores further signals while that cleanup runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from types import FrameType

from rich.console import Console

__all__ = ["Stop", "console", "err_console", "make_console", "shielded",
           "terminate_as_interrupt"]


def make_console(stderr: bool = False) -> Console:
    """A rich Console; when output is piped (CI logs, files) it is 140 columns wide instead
    of rich's 80, so that tables are not truncated."""
    probe = Console(stderr=stderr)
    if probe.is_terminal or os.environ.get("COLUMNS"):
        return probe
    return Console(stderr=stderr, width=140)


console = make_console()
err_console = make_console(stderr=True)


class Stop(Exception):
    """Raised in the main thread by SIGTERM/SIGHUP so cleanup runs as for Ctrl-C."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into `Stop`, so `finally` blocks stop our processes."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore Ctrl-C / SIGTERM / SIGHUP while we stop things: a second signal during
    shutdown must not leave half the lab running."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
