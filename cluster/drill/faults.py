"""Fault injection for the failover drills, on a lab's processes and WAN emulator.

- `crash_region`: SIGKILL of a region's node and of its PostgreSQL - the postmaster's
  whole process group (the lab starts every server in a session of its own, so the
  group id is the pid it recorded), so no backend survives to finish a commit - by pid,
  after checking the pid is still the process the lab started.
- `restart_store` / `restart_node`: bring them back on the same ports and data, and
  record the new pids in cluster.json.
- `isolate_region` / `heal_region`: cut (or heal) every WAN link to and from a region:
  replication, gRPC and the lock quorum's Redis, both directions. The geo router talks to
  the nodes directly, so clients still reach the isolated region - as they would a
  region whose inter-region links failed while its front door stayed up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil

from cluster.errors import LabError
from cluster.lab import Cluster
from cluster.servers import PostgresServer, ServerProcess


class FaultError(LabError):
    """A fault could not be injected or undone."""


def _kill_group(proc: ServerProcess, timeout: float = 10.0) -> int:
    """SIGKILL `proc`'s process group (it leads one: see cluster.servers.spawn) and wait
    until every member is gone; returns how many processes were killed."""
    if not proc.is_running():
        raise FaultError(f"{proc.kind} (pid {proc.pid}) is not running, or not ours")
    try:
        members = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        members = []
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # not a group leader after all: the pid itself, then what it forked
            for member in members:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(members, timeout=timeout)
    if alive:
        raise FaultError(f"still alive after SIGKILL: {[p.pid for p in alive]}")
    popen = proc._popen
    if popen is not None:
        with contextlib.suppress(Exception):
            popen.wait(1)
    return len(members)


def crash_region(cluster: Cluster, name: str) -> dict[str, int]:
    """SIGKILL region `name`'s node and PostgreSQL (Redis and NATS stay up: the drill
    loses the region's compute and store, not the lock quorum's member). Returns the pids
    killed."""
    region = cluster.region(name)
    killed: dict[str, int] = {}
    if region.node is not None and region.node.is_running():
        killed["node"] = region.node.pid
        _kill_group(region.node)
    killed["postgres"] = region.servers.postgres.pid
    _kill_group(region.servers.postgres)
    return killed


def restart_store(cluster: Cluster, name: str, timeout: float = 60.0) -> PostgresServer:
    """Start region `name`'s PostgreSQL again on its port and data (crash recovery runs)
    the way the lab started it (`replication.reconcile.start_store`: with the TLS
    gateway's socket if it had one), and record the new pid."""
    from cluster.rejoin import start_store

    region = cluster.region(name)
    old = region.servers.postgres
    if old.is_running():
        raise FaultError(f"{name}'s PostgreSQL (pid {old.pid}) is still running")
    start_store(cluster, name, timeout=timeout)
    cluster.write()
    return region.servers.postgres


def restart_node(cluster: Cluster, name: str) -> None:
    """Start region `name`'s node again (after a crash) and record its pid."""
    cluster.restart_node(name)


def _peers(cluster: Cluster, name: str) -> list[str]:
    return [r for r in cluster.names if r != name]


def isolate_region(cluster: Cluster, name: str, mode: str = "blackhole") -> float:
    """Cut every WAN link between `name` and the other regions, both directions; returns
    the time (time.time) the last cut took effect."""
    with cluster.wan_control() as wan:
        for other in _peers(cluster, name):
            wan.cut(name, other, mode=mode)  # type: ignore[arg-type]
    return time.time()


def heal_region(cluster: Cluster, name: str) -> None:
    """Heal every WAN link between `name` and the other regions."""
    with cluster.wan_control() as wan:
        for other in _peers(cluster, name):
            wan.heal(name, other)


def slow_links(cluster: Cluster, name: str, extra_one_way: float) -> None:
    """Add `extra_one_way` seconds of delay to the WAN links the other regions opened to
    region `name` (their subscriptions to it, among others), or with 0 set them back to
    the lab's round trips: `name`'s changes then reach the others that much later."""
    from cluster.lab import link_rtt

    with cluster.wan_control() as wan:
        for other in _peers(cluster, name):
            rtt = link_rtt(other, name, cluster.wan_scale) + 2 * extra_one_way
            wan.set(other, name, rtt_ms=rtt * 1000.0, both_directions=False)


def drop_in_flight(cluster: Cluster, name: str, heal: bool = False) -> None:
    """Reset the WAN links the other regions opened to region `name`, dropping whatever
    of its stream is still on the wire (a region that dies loses its packets in flight
    too); with `heal`, let them through again."""
    with cluster.wan_control() as wan:
        for other in _peers(cluster, name):
            if heal:
                wan.heal(other, name, both_directions=False)
            else:
                wan.cut(other, name, mode="reset", both_directions=False)
