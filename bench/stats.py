"""What every benchmark here shares: the record of a timed run, percentiles, and how a
self-started lab is stopped."""

from __future__ import annotations

import math
import shutil
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

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


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (nan if empty)."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(1, math.ceil(pct / 100 * len(sorted_values))) - 1]


def stop_lab(cluster: Cluster, console: Console, what: str, temp_dir: Path | None, *,
             keep: bool) -> None:
    """Stop a lab the benchmark started; remove its temp dir unless the run failed."""
    # Ignore further Ctrl-C / SIGTERM while stopping: a half-stopped lab would leak.
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        with console.status(f"stopping the {what} ..."):
            cluster.stop()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if temp_dir is not None and not keep:
        shutil.rmtree(temp_dir, ignore_errors=True)
    elif temp_dir is not None:
        console.print(f"kept {temp_dir} for the logs")
