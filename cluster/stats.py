"""The one percentile of the project's measurements (demo, drills, benchmarks)."""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], pct: float) -> float:
    """The nearest-rank `pct`-th percentile (0-100) of `values`, in any order; nan if empty.

    Nearest rank: the smallest value with at least pct% of the values at or below it,
    i.e. the ceil(pct/100 * n)-th of the sorted values (the 100th is the maximum, the 0th
    the minimum). Always one of the measured values, never an interpolation."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = math.ceil(pct / 100 * len(ordered))
    return ordered[min(len(ordered) - 1, max(0, rank - 1))]
