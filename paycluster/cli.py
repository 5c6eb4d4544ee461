"""The `paycluster` console script: cluster/'s typer app with the benchmarks added.

The lab (`cluster`) sits below the benchmarks (`bench`, which start labs), so
cluster/cli.py cannot import them (tests/test_layering.py). This module sits above both
and assembles the installed command tree from their (typer's click) commands without changing
either typer app:

    paycluster bench             bench.payments  (also `python -m bench.payments`)
    paycluster router bench      bench.router    (also `python -m bench.router`)
    paycluster durability bench  bench.durability (also `python -m bench.durability`)

Every other benchmark is a typer app of its own, run with `python -m bench.NAME`.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from bench import durability as durability_bench
from bench import payments as payments_bench
from bench import router as router_bench
from cluster.cli import app as cluster_app

BENCHMARKS = ((None, payments_bench.app), ("router", router_bench.app),
              ("durability", durability_bench.app))
"""Where each benchmark appears: `bench` under the root (None) or under that group."""


def command() -> TyperGroup:
    """The whole `paycluster` command tree (a new click group on every call)."""
    root = typer.main.get_command(cluster_app)
    assert isinstance(root, TyperGroup)
    for group, bench_app in BENCHMARKS:
        parent = root if group is None else root.commands[group]
        assert isinstance(parent, TyperGroup)
        cmd = typer.main.get_command(bench_app)
        cmd.name = "bench"  # listings show the command's own name, not the one added under
        parent.add_command(cmd)
    return root


def main() -> None:
    """Entry point of the `paycluster` console script."""
    command()(prog_name="paycluster")
