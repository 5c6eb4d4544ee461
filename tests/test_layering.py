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


KNOWN_CIRCLES = {
    frozenset({"lock_service.quorum", "lock_service.watchdog"}),
    frozenset({"cluster.deploy", "cluster.drill.deploy"}),
}
"""Import circles between modules, each written down with its reason: the lock client and
its lease watchdog are one job split in two files (quorum imports the watchdog lazily to
hand out held locks); `paycluster deploy drill` is registered by the deploy commands and
runs on their topology."""


def _module_graph() -> dict[str, set[str]]:
    """Module -> our modules it imports (anywhere in the file, lazily too)."""
    files: dict[str, Path] = {}
    for pkg in LAYERS + BESIDE:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[name] |= {n for n in names if n in files and n != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_but_the_written_ones() -> None:
    circles = _circles(_module_graph())
    assert circles - KNOWN_CIRCLES == set(), "new import circles"
    assert KNOWN_CIRCLES - circles == set(), "gone: remove them from KNOWN_CIRCLES"


def test_the_circle_finder_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {
        frozenset({"a", "b", "c"})}
