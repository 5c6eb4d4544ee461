"""Bringing a region of the lab back after it lost a forced takeover: the process control
around `replication.reconcile` (which only reads and writes the stores it is given).

`start_store` starts the region's PostgreSQL again, the way the lab first started it, so
that its lost tail can be read (`replication.reconcile.lost_tail`); `rejoin_region` stops
its node, rebuilds its database (`replication.reconcile.rebuild_region`) and starts the
node again.
"""

from __future__ import annotations

from pathlib import Path

from cluster.lab import Cluster
from cluster.servers import start_postgres, started_with_gateway
from replication.join import AddRegionReport
from replication.reconcile import rebuild_region


def start_store(cluster: Cluster, name: str, timeout: float = 60.0) -> None:
    """Start region `name`'s PostgreSQL again (after a crash: recovery runs) on its port
    and data, the way the lab first started it (with the TLS gateway's unix socket when
    it had one: `cluster.servers.start_postgres(gateway=...)`); a running one is left
    alone. Records the new pid in cluster.json."""
    region = cluster.region(name)
    pg = region.servers.postgres
    if pg.is_running():
        return
    cluster.check_running()
    gateway = started_with_gateway(Path(pg.data_dir))
    region.servers.postgres = start_postgres(Path(pg.data_dir), port=pg.port, timeout=timeout,
                                             gateway=gateway)
    cluster.write()
    if cluster.stopping:  # the lab's stop began meanwhile: it may have passed this one
        region.servers.postgres.stop()
        cluster.check_running()


def rejoin_region(cluster: Cluster, name: str, *, donor: str | None = None,
                  timeout: float = 120.0) -> AddRegionReport:
    """Rebuild region `name` of the lab `cluster` after it lost a forced takeover: stop its
    node, start its PostgreSQL if it is down, rebuild its database from `donor` (default:
    the first other region) with `replication.reconcile.rebuild_region`, and start its
    node. List its lost tail with `replication.reconcile.lost_tail` first: the rebuild
    discards it. Synchronous."""
    cluster.adopt_recorded()  # the CLI may have restarted them since this handle did
    region = cluster.region(name)
    if region.node is not None and region.node.is_running():
        region.node.stop()
    start_store(cluster, name)
    report = rebuild_region(name, cluster.region_dbs(), donor=donor, timeout_seconds=timeout)
    if region.node is not None:
        cluster.restart_node(name)
    else:
        cluster.start_node(name)
    return report
