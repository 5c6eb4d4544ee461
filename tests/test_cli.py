"""The command line reads one way: every command's --help works, --version, and the
fixed value sets the options offer are the ones the lower layers accept.

The help test walks the assembled `paycluster` tree (paycluster.cli.command()), so a
command added anywhere is covered without touching this file. It starts no servers.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Iterator

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

import bench
from cluster.cli_options import CutMode, DurabilityMode, Resolution
from cluster.wan import CUT_MODES
from paycluster.cli import command
from region_node.reconciliation import RESOLUTIONS
from replication.durability import MODES


def _paths(group: TyperGroup, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path of the tree, groups included (the root is ())."""
    yield prefix
    for name, sub in group.commands.items():
        if isinstance(sub, TyperGroup):
            yield from _paths(sub, (*prefix, name))
        else:
            yield (*prefix, name)


ROOT = command()
PATHS = sorted(_paths(ROOT))


def _invoke(args: list[str]) -> tuple[int, str]:
    """Run the assembled tree in-process: (exit code, stdout and stderr). typer's
    CliRunner.invoke wants a typer app and builds its command itself; the tree is
    already a command, so it runs under the runner's isolation directly."""
    with CliRunner().isolation() as streams:
        try:
            ROOT.main(args, prog_name="paycluster")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        output = streams[-1].getvalue().decode()
    return code, output


def test_the_tree_has_every_kind_of_command() -> None:
    """A sanity check that the walk sees the whole tree, benchmarks included."""
    assert {("up",), ("status",), ("bench",), ("router", "bench"), ("durability", "bench"),
            ("drill", "partition"), ("link", "cut"), ("reconcile", "resolve")} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "paycluster")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help(path: tuple[str, ...], flag: str) -> None:
    code, output = _invoke([*path, flag])
    assert code == 0, output
    # Its own usage line, under the installed name (not `python -m bench.X`).
    assert f"Usage: paycluster {' '.join(path)}".rstrip() in " ".join(output.split())


def test_version_is_the_package_metadata() -> None:
    code, output = _invoke(["--version"])
    assert code == 0, output
    assert output.strip() == f"paycluster {importlib.metadata.version('paycluster')}"


def test_choices_are_what_the_lower_layers_accept() -> None:
    assert tuple(DurabilityMode) == MODES
    assert tuple(Resolution) == RESOLUTIONS
    assert set(CutMode) == set(CUT_MODES)


@pytest.mark.parametrize("args", [
    ["durability", "set", "us-east", "sometimes"],
    ["reconcile", "resolve", "--home", "us-east", "--epoch", "1", "--item", "x",
     "--resolution", "forgive", "--note", "n"],
    ["link", "cut", "us-east", "eu-west", "--mode", "drop"],
    ["drill", "partition", "--region", "us-east", "--cut-mode", "drop"],
    ["up", "--durability", "maybe"],
])
def test_a_value_outside_a_choice_is_a_usage_error(args: list[str]) -> None:
    """Refused by the parser (exit 2) before anything is read or started."""
    code, output = _invoke(args)
    assert code == 2, output
    assert "Invalid value" in output


def test_short_options_mean_one_thing() -> None:
    """-n is a count of regions, -r a region name, -d the data dir, wherever they appear."""
    meaning = {"-n": set(), "-r": set(), "-d": set()}
    for path in PATHS:
        cmd = ROOT
        for name in path:
            assert isinstance(cmd, TyperGroup)
            cmd = cmd.commands[name]
        for param in getattr(cmd, "params", []):
            for short in meaning:
                if short in param.opts:
                    meaning[short].add(param.opts[0] if param.opts[0] != short
                                       else param.opts[-1])
    assert meaning["-r"] <= {"--region"}, meaning
    assert meaning["-d"] <= {"--data-dir"}, meaning
    # bench.payments has -n/--payments (a count of payments); regions elsewhere.
    assert meaning["-n"] <= {"--regions", "--payments"}, meaning


BENCH_MODULES = sorted(m.name for m in pkgutil.iter_modules(bench.__path__)
                       if m.name not in ("runner", "stats"))


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_every_benchmark_is_a_typer_app_with_help(name: str) -> None:
    """`python -m bench.NAME --help` for every benchmark module (found by listing the
    package, so a new one is covered): one typer app, the same help style as paycluster."""
    module = importlib.import_module(f"bench.{name}")
    assert isinstance(getattr(module, "app", None), typer.Typer), f"bench.{name} has no app"
    out = CliRunner().invoke(module.app, ["--help"], prog_name=f"python -m bench.{name}")
    assert out.exit_code == 0, out.output
    assert f"Usage: python -m bench.{name}" in out.output
