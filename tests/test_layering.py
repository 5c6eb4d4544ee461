"""Imports run one way: a package never imports one above it (the architecture's map).

The layers, written down once, top to bottom: `paycluster` (the installed command line,
assembling the lab's commands and the benchmarks) -> `bench` -> `cluster` -> `replication`
-> `region_node` -> `lock_service`. Beside them: `geo_router`, which may use only the node's
published contracts (region names and ids, masking, trace headers), and `channel`, an
outside party that imports nothing of ours; its client and signature check are its SDK.
`cluster` (the lab) may start anything.

KNOWN_UPWARD lists the upward imports that exist today, each to be removed (issue 19);
the test fails on any new one, and on an exception that is gone (so the list only
shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("lock_service", "region_node", "replication", "cluster", "bench", "paycluster")
"""Bottom to top: a package may import the ones before it."""
BESIDE = ("geo_router", "channel")
ROUTER_MAY_USE = ("region_node.regions", "region_node.redact", "region_node.tracing",
                  "region_node.ids")
"""The node's published contracts the geo router may import."""
CHANNEL_SDK = ("channel.client", "channel.signing")
"""The acquirer's client and callback verification: what a region uses as a merchant
would use its acquirer's SDK (the channel itself imports nothing of ours)."""

KNOWN_UPWARD: set[tuple[str, str]] = set()


def _imports() -> set[tuple[str, str]]:
    """(file, imported module) for every absolute import of one of our packages made by
    another of our packages."""
    ours = set(LAYERS) | set(BESIDE)
    found: set[tuple[str, str]] = set()
    for pkg in ours:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in ours and top != pkg:
                        found.add((path.relative_to(ROOT).as_posix(), name))
    return found


def _allowed(file: str, module: str) -> bool:
    pkg, target = file.split("/")[0], module.split(".")[0]
    if pkg == "channel":
        return False
    if pkg == "geo_router":
        return module.startswith(ROUTER_MAY_USE)
    if module.startswith(CHANNEL_SDK):
        return True
    if target in BESIDE:
        return pkg == "cluster"  # the lab starts routers and the channel
    return LAYERS.index(target) < LAYERS.index(pkg)


def test_no_package_imports_one_above_it() -> None:
    upward = {(f, m) for f, m in _imports() if not _allowed(f, m)}
    assert upward - KNOWN_UPWARD == set(), "new upward imports"
    assert KNOWN_UPWARD - upward == set(), "gone: remove them from KNOWN_UPWARD"


def test_protobuf_stays_inside_rpc() -> None:
    # The architecture's map: protobuf types stay inside region_node/rpc/ (rpc/wire.py
    # converts them); everything else speaks domain types.
    wire_modules = ("region_node.rpc.region_pb2", "region_node.rpc.region_pb2_grpc")
    outside: set[str] = set()
    for pkg in LAYERS + BESIDE:
        for path in (ROOT / pkg).rglob("*.py"):
            file = path.relative_to(ROOT).as_posix()
            if file.startswith("region_node/rpc/"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                if any(n.startswith(wire_modules) for n in names):
                    outside.add(file)
    assert outside == set(), "protobuf imported outside region_node/rpc/"
