"""What every benchmark here shares: the record of a timed run, percentiles, and how a
self-started lab is stopped."""

from __future__ import annotations

import contextlib
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console

from cluster.console import shielded
from cluster.lab import Cluster


@dataclass
class TimedRun:
    """One timed batch of requests: successes, errors by kind, latencies."""

    ok: int = 0
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        """Successful requests per second."""
        return self.ok / self.seconds if self.seconds else 0.0


def stop_lab(cluster: Cluster, console: Console, what: str, temp_dir: Path | None, *,
             keep: bool) -> None:
    """Stop a lab the benchmark started; remove its temp dir unless the run failed."""
    # Ignore further Ctrl-C / SIGTERM / SIGHUP while stopping: a half-stopped lab would leak.
    with shielded(), console.status(f"stopping the {what} ..."):
        cluster.stop()
    if temp_dir is not None and not keep:
        shutil.rmtree(temp_dir, ignore_errors=True)
    elif temp_dir is not None:
        console.print(f"kept {temp_dir} for the logs")


def process_cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """User + system CPU seconds of process `pid` so far (0.0 if it is gone).

    `with_children`: also every live child's, and what its reaped children used
    (PostgreSQL's postmaster reaps the backends: pgbench's short-lived ones count too)."""
    try:
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        total = t.user + t.system
        if with_children:
            total += t.children_user + t.children_system
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    ct = child.cpu_times()
                    total += ct.user + ct.system
        return total
    except psutil.Error:
        return 0.0


@dataclass
class CpuMeter:
    """CPU seconds used by named processes between `start` and `stop`: the figure that a
    shared, noisy machine does not move (per operation: divide by the operations)."""

    pids: dict[str, tuple[int, bool]]
    """name -> (pid, count its children) ; the load generator is this process."""
    used: dict[str, float] = field(default_factory=dict)
    _at_start: dict[str, float] = field(default_factory=dict)

    def _now(self) -> dict[str, float]:
        now = {name: process_cpu_seconds(pid, with_children=kids)
               for name, (pid, kids) in self.pids.items()}
        t = psutil.Process().cpu_times()
        now["client"] = t.user + t.system
        return now

    def start(self) -> None:
        """Take the starting reading."""
        self._at_start = self._now()

    def stop(self) -> dict[str, float]:
        """CPU seconds per process since `start`."""
        end = self._now()
        self.used = {k: end[k] - self._at_start.get(k, 0.0) for k in end}
        return self.used
