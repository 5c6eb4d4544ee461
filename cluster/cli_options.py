"""The options every `paycluster` command spells the same way, and the fixed value sets
they accept (choices, so `--help` lists them and a typo is a usage error).

Short options mean one thing everywhere: `-d` the data dir, `-n` a count of regions,
`-r` a region name. Commands that work on a running lab default `--data-dir` to
`DEFAULT_DATA_DIR`; commands that start a lab of their own (demo, drill, benchmarks)
default to a temporary directory they remove afterwards.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from cluster.wan import REGIONS as REGION_NAMES

HELP_CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"]}
"""Context settings of every command line: `-h` and `--help` both print the help."""

DEFAULT_DATA_DIR = Path("data")
"""Where a running lab is looked for unless --data-dir says otherwise."""

DataDir = Annotated[Path, typer.Option("--data-dir", "-d", help="where the lab keeps its files "
                                       "and cluster.json")]
RegionCount = Annotated[int, typer.Option("--regions", "-n", min=1, max=len(REGION_NAMES),
                                          help=f"how many regions (1-{len(REGION_NAMES)}: "
                                               f"{', '.join(REGION_NAMES)})")]
WanScale = Annotated[float, typer.Option("--wan-scale", min=0.0,
                                         help="multiplier of the default inter-region round "
                                              "trips (0 = no delay)")]
Routers = Annotated[int, typer.Option(
    "--routers", min=0, max=len(REGION_NAMES),
    help="geo routers to start (0 = none). Production runs one per region; in the lab one "
         "router serves every client (clients say where they are with X-Client-Region / "
         "X-Client-Geo), and more show that every router decides the same")]
RegionArg = Annotated[str, typer.Argument(help="region name, e.g. us-east")]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable")]


class CutMode(StrEnum):
    """How a cut link fails (see cluster.wan).

    Every command that cuts links (`link cut`, `drill partition --cut-mode`, `deploy link
    cut`) defaults to `blackhole`: a WAN partition usually drops packets silently, so the
    realistic case is connections that hang until their own timeouts fire; `reset` is the
    gentler one where they fail at once."""

    blackhole = "blackhole"
    reset = "reset"


DEFAULT_CUT_MODE = CutMode.blackhole


class DurabilityMode(StrEnum):
    """A region's durability mode (replication.durability.MODES; tests/test_cli.py checks
    they match)."""

    local = "local"
    regional = "regional"


class Resolution(StrEnum):
    """How a reconciliation item is settled (region_node.reconciliation.RESOLUTIONS)."""

    # Spelled out rather than imported: region_node.reconciliation pulls in the ledger and
    # SQLAlchemy, which a --help should not wait for (tests/test_cli.py checks they match).
    acknowledge = "acknowledge"
    claw_back = "claw_back"
    write_off = "write_off"
