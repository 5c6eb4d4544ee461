"""The local lab: real servers and a region node per region, and the cluster.json that
records them so that any later process (`paycluster status`, `paycluster down`) can find
and stop them by pid.

cluster.json is rewritten after every region that comes up, so a lab that dies half-way
still leaves behind the list of what it started.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import psutil

from cluster.nodes import NodeProcess, start_node
from cluster.servers import RegionServers, start_region_servers, stop_pid

REGION_NAMES: tuple[str, ...] = ("us-east", "eu-west", "ap-southeast")
"""Regions of the lab, in the order they are started."""

CLUSTER_FILE = "cluster.json"
SCHEMA_VERSION = 1

# Seconds a process gets between its polite signal and SIGKILL.
_STOP_TIMEOUT = 15.0


class ClusterError(RuntimeError):
    """The lab cannot start or find a cluster (e.g. one is already running there)."""


@dataclass
class Region:
    """One region of the lab: its servers and its node."""

    name: str
    servers: RegionServers
    node: NodeProcess

    @property
    def api_url(self) -> str:
        """Base URL of this region's REST API."""
        return self.node.api_url

    def stop(self) -> None:
        """Stop the node first (so it drains against live servers), then the servers."""
        with contextlib.suppress(Exception):
            self.node.stop()
        self.servers.stop()

    def to_json(self) -> dict[str, object]:
        """This region's entry in cluster.json."""
        return {
            "api_url": self.api_url,
            "postgres_dsn": self.servers.postgres.dsn("paycluster"),
            "redis_url": self.servers.redis.url,
            "nats_url": self.servers.nats.url,
            "node": _with_start_time(self.node.to_json()),
            **{kind: _with_start_time(cast(dict[str, object], entry))
               for kind, entry in self.servers.to_json().items()},
        }


@dataclass
class Cluster:
    """A running lab; `stop()` stops everything it started. Usable as a context manager."""

    data_dir: Path
    regions: list[Region] = field(default_factory=list)
    detached: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def cluster_file(self) -> Path:
        """Where this cluster's cluster.json lives."""
        return self.data_dir / CLUSTER_FILE

    def region(self, name: str) -> Region:
        """The region called `name`."""
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(name)

    def restart_node(self, name: str, crash: bool = False) -> NodeProcess:
        """Restart region `name`'s node on the same port (SIGKILL first if `crash`) and
        record its new pid in cluster.json."""
        node = self.region(name).node
        if crash:
            node.kill()
        node.restart()
        self.write()
        return node

    def write(self, status: str = "running") -> None:
        """(Re)write cluster.json atomically, e.g. after a node restart changed its pid."""
        with self._lock:
            doc = {
                "version": SCHEMA_VERSION,
                "status": status,
                "data_dir": str(self.data_dir),
                "updated_at": datetime.now(UTC).isoformat(),
                # The foreground `up` that owns the processes; None when detached.
                "owner_pid": None if self.detached else os.getpid(),
                "regions": {r.name: r.to_json() for r in self.regions},
            }
            _write_json(self.cluster_file, doc)

    def stop(self) -> None:
        """Stop every region (reverse start order) and mark cluster.json stopped."""
        with self._lock:
            regions = list(reversed(self.regions))
        for region in regions:
            region.stop()
        with contextlib.suppress(OSError):
            self.write(status="stopped")
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    # Write-then-rename so a reader never sees half a file.
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def _with_start_time(entry: dict[str, object]) -> dict[str, object]:
    """Add the process start time, so a reused pid is never mistaken for ours."""
    pid = entry.get("pid")
    started: float | None = None
    if isinstance(pid, int):
        with contextlib.suppress(psutil.Error):
            started = psutil.Process(pid).create_time()
    return {**entry, "started_at": started}


def _start_region(name: str, data_dir: Path, api_port: int | None = None,
                  node_env: dict[str, str] | None = None) -> Region:
    servers = start_region_servers(name, data_dir)
    try:
        node = start_node(name, servers, data_dir, api_port=api_port, extra_env=node_env)
    except BaseException:
        servers.stop()
        raise
    return Region(name, servers, node)


def start_cluster(data_dir: Path, regions: int = 1, detach: bool = False,
                  node_env: dict[str, str] | None = None) -> Cluster:
    """Start `regions` regions (servers + node each) under `data_dir`; write cluster.json.

    Regions start in parallel and are named from REGION_NAMES. If any region fails (or we
    are interrupted), every process already started is stopped before the error
    propagates. With `detach=False` the caller owns the processes: they are also stopped
    when this interpreter exits normally. With `detach=True` they outlive us and
    cluster.json is the handle to stop them (`stop_cluster`).
    """
    if not 1 <= regions <= len(REGION_NAMES):
        raise ValueError(f"regions must be between 1 and {len(REGION_NAMES)}, got {regions}")
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    alive = running_pids(data_dir)
    if alive:
        raise ClusterError(f"a cluster is already running in {data_dir} (pids "
                           f"{', '.join(map(str, alive))}); stop it with `paycluster down`")
    cluster = Cluster(data_dir, detached=detach)
    names = REGION_NAMES[:regions]
    pool = ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="region-start")
    futures: list[Future[Region]] = []
    try:
        for name in names:
            futures.append(pool.submit(_start_region, name, data_dir, None, node_env))
        # Record each region as soon as it is up, so cluster.json lists its pids even if
        # we die before the others are.
        for future in as_completed(futures):
            with cluster._lock:
                cluster.regions.append(future.result())
            cluster.write(status="starting")
    except BaseException:
        # Let every start finish or fail (each is bounded by its own timeouts), then stop
        # all regions that did come up; a region that failed cleaned up after itself.
        _wait_all(futures)
        recorded = {id(r) for r in cluster.regions}
        for future in futures:
            if future.exception() is None and id(future.result()) not in recorded:
                cluster.regions.append(future.result())
        cluster.stop()
        raise
    finally:
        pool.shutdown(wait=True)
    cluster.regions.sort(key=lambda r: names.index(r.name))
    cluster.write(status="running")
    if not detach:
        atexit.register(cluster.stop)
    return cluster


def _wait_all(futures: list[Future[Region]]) -> None:
    while True:
        try:
            wait(futures)
            return
        except KeyboardInterrupt:
            # Already cleaning up: giving up now would leak the processes still starting.
            continue


def read_cluster(data_dir: Path) -> dict[str, Any]:
    """The parsed cluster.json of `data_dir`; ClusterError if there is none."""
    path = data_dir.resolve() / CLUSTER_FILE
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterError(f"no cluster in {data_dir.resolve()} (no {CLUSTER_FILE})") from None
    except json.JSONDecodeError as exc:
        raise ClusterError(f"{path} is not valid JSON: {exc}") from None
    return doc


# Stop order within a region: the node first, the store last.
_STOP_ORDER = ("node", "nats", "redis", "postgres")


def _processes(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(region, kind, entry) for every process cluster.json lists, in stop order."""
    for region_name, region in reversed(list(doc.get("regions", {}).items())):
        for kind in _STOP_ORDER:
            entry = region.get(kind)
            if isinstance(entry, dict) and isinstance(entry.get("pid"), int):
                yield region_name, kind, entry


def is_ours(entry: dict[str, Any]) -> bool:
    """True if the pid in `entry` is alive and still the process we started.

    A pid whose start time differs from the recorded one has been reused by an unrelated
    process after ours died; it must never be signalled.
    """
    try:
        proc = psutil.Process(int(entry["pid"]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False
    recorded = entry.get("started_at")
    return recorded is None or abs(float(recorded) - created) < 1.0


def running_pids(data_dir: Path) -> list[int]:
    """Pids from `data_dir`'s cluster.json that are still alive and ours ([] if none)."""
    try:
        doc = read_cluster(data_dir)
    except ClusterError:
        return []
    return [int(entry["pid"]) for _, _, entry in _processes(doc) if is_ours(entry)]


def _stop_orphan(pid: int, sig: int, timeout: float) -> None:
    """Signal a process (and its group) that is not our child; SIGKILL after `timeout`.

    Unlike stop_pid this counts a zombie as stopped: a detached lab's processes are
    children of init, which reaps them on its own schedule (seconds, in some containers),
    and waiting for that would make `down` take seconds per process.
    """
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.send_signal(sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)
    stop_pid(pid, signal.SIGKILL, 5)


def stop_cluster(data_dir: Path, timeout: float = _STOP_TIMEOUT) -> list[tuple[str, str, int]]:
    """Stop every process `data_dir`'s cluster.json lists, by pid, and mark it stopped.

    Already-dead pids (and pids that now belong to someone else) are skipped. Returns
    (region, kind, pid) of the processes that were running and got stopped.
    """
    doc = read_cluster(data_dir)
    stopped: list[tuple[str, str, int]] = []
    for region_name, kind, entry in _processes(doc):
        if not is_ours(entry):
            continue
        # SIGINT is PostgreSQL's fast shutdown; everything else stops on SIGTERM.
        sig = signal.SIGINT if kind == "postgres" else signal.SIGTERM
        _stop_orphan(int(entry["pid"]), sig, timeout)
        stopped.append((region_name, kind, int(entry["pid"])))
    doc["status"] = "stopped"
    doc["updated_at"] = datetime.now(UTC).isoformat()
    _write_json(data_dir.resolve() / CLUSTER_FILE, doc)
    return stopped
