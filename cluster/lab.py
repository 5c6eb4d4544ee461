"""The local lab: real servers and a region node per region, the WAN-link emulator between
the regions, and the cluster.json that records them so that any later process
(`paycluster status`, `paycluster link`, `paycluster region add`, `paycluster down`) can
find, change and stop them by pid.

Start order of a multi-region lab (`start_cluster`):

1. every region's PostgreSQL, Redis and NATS, in parallel;
2. ONE WAN emulator process (`python -m cluster.wan`) with, for every ordered pair of
   regions (src, dst), a `postgres` link (src's subscription -> dst's PostgreSQL), a
   `grpc` link (src's node -> dst's gRPC server) and a `redis` link (src -> dst's Redis,
   for the lock quorum); round-trip times from `link_rtt(src, dst, wan_scale)`;
   then ONE TLS gateway process (`python -m cluster.pg_tls`): replication crosses the
   postgres links only as mutual TLS between the regions' gateways (certificates of the
   lab's CA, `cluster.pki`, made before anything starts; the nodes get theirs for gRPC);
3. the schema on every region's database (`region_node.migrate.upgrade`);
4. replication: every region publishes and subscribes to every other THROUGH the
   postgres links (`replication.wiring.wire_cluster`), before any node writes a row;
   then each region's durability mode (`cluster.durability`: in `regional` mode its
   buddy's walsender is a `sync` standby before anything else commits);
5. the nodes, in parallel, each with its gRPC port and its peers reached through the
   grpc links (`PAYCLUSTER_PEERS`: other region -> the WAN link port, never the peer's
   own port);
6. the geo router(s) (`python -m geo_router`, `start_cluster(routers=N)`), which read
   the regions from cluster.json itself and probe every node; router i is labelled as
   deployed in region i. They share one overrides file (drain, weights) under
   `<data_dir>/router/`. The router talks to the nodes directly, not through the WAN
   emulator: the emulator models links between regions, and a client's own distance to
   a region is what the router decides on, not something to add on top.

cluster.json is rewritten after every step (and every region that comes up), so a lab
that dies half-way still leaves behind the list of what it started. It is the one handle
on a running lab: `Cluster.load` attaches to it from another process. One process at a
time should change a lab (a write from a stale `Cluster` object would drop what another
process recorded meanwhile); `Cluster.stop` stops whatever the file lists as well.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import psutil

from cluster.errors import LabError
from cluster.nodes import READY_TIMEOUT, NodeProcess, node_env, start_node
from cluster.pg_tls import ClientSpec, GatewayProcess, ServerSpec, start_gateways
from cluster.pg_tls import load_config as load_gateway_config
from cluster.pki import ensure_cluster_pki, region_tls_files
from cluster.servers import (
    ChannelServer,
    NatsServer,
    PostgresServer,
    RedisServer,
    RegionServers,
    ServerProcess,
    free_port,
    is_ours,
    remove_temp_socket_dir,
    spawn,
    start_channel,
    start_region_servers,
    stop_pid,
    wait_ready_line,
)
from cluster.wan import REGIONS, WanControl, link_rtt

log = logging.getLogger(__name__)

REGION_NAMES: tuple[str, ...] = REGIONS
"""Regions of the lab (the one list is cluster.wan.REGIONS), in the order they are
started (`start_cluster(regions=N)` takes the first N). More can join a running lab with
`add_region`."""

WAN_SERVICES: tuple[str, ...] = ("postgres", "grpc", "redis")
"""The services every ordered region pair gets a WAN link for."""

CLUSTER_FILE = "cluster.json"
SCHEMA_VERSION = 2

WAN_READY_TIMEOUT = 60.0
"""Seconds the WAN emulator gets to open its links and print its ready line. Like the
nodes' (cluster.nodes.READY_TIMEOUT), it tells a hang from a slow start: on a starved
2-core machine a Python process's imports alone took over 10 s."""

ROUTER_READY_TIMEOUT = 60.0
"""Seconds a geo router gets to probe the regions once and print its ready line (as
generous as the WAN emulator's, for the same reason)."""

ROUTER_OVERRIDES = "overrides.json"
"""The routers' shared drain/weight file, under `<data_dir>/router/`."""

ROUTER_PRINCIPAL = "geo-router"
"""Name of the non-admin principal whose key (cluster.json `router_key`) the geo routers
read `GET /v1/cluster/ownership` with: any principal may read it, so no admin key."""

# Seconds a process gets between its polite signal and SIGKILL.
_STOP_TIMEOUT = 15.0

_T = TypeVar("_T")
_R = TypeVar("_R")


class ClusterError(LabError):
    """The lab cannot start, find or change a cluster (e.g. one already runs there)."""


# --------------------------------------------------------------------------- processes


@dataclass
class WanProcess(ServerProcess):
    """The WAN emulator process (`python -m cluster.wan`); `port` is its control API's."""

    control_url: str = ""
    scale: float = 1.0

    def control(self) -> WanControl:
        """A client of the emulator's control API (close it, or use it in a `with`)."""
        return WanControl(self.control_url)

    def to_json(self) -> dict[str, object]:
        """What cluster.json records about the emulator."""
        return {**super().to_json(), "control_url": self.control_url, "scale": self.scale}


def _wan_specs(pairs: Iterable[tuple[str, str]], targets: dict[str, dict[str, int]],
               scale: float) -> list[dict[str, Any]]:
    """Link specs (cluster.wan's config format) for `pairs`, every service of WAN_SERVICES."""
    return [{"src": src, "dst": dst, "service": service, "target_host": "127.0.0.1",
             "target_port": targets[dst][service],
             "rtt_ms": round(link_rtt(src, dst, scale) * 1000.0, 3)}
            for src, dst in pairs for service in WAN_SERVICES]


def start_wan(data_dir: Path, specs: list[dict[str, Any]], scale: float,
              timeout: float = WAN_READY_TIMEOUT) -> tuple[WanProcess, list[dict[str, Any]]]:
    """Start `python -m cluster.wan` with the links `specs`; return it and its links' state.

    Its files go under `data_dir/wan/` (links.json, wan.log). Ready when it printed its
    JSON ready line (into the log); killed, with ServerStartError, if it exits or times
    out first.
    """
    wan_dir = (data_dir / "wan").resolve()
    wan_dir.mkdir(parents=True, exist_ok=True)
    config = wan_dir / "links.json"
    config.write_text(json.dumps({"scale": scale, "links": specs}, indent=2) + "\n")
    log_path = wan_dir / "wan.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    cmd = [sys.executable, "-m", "cluster.wan", "--control-port", "0", "--config", str(config),
           "--scale", repr(scale)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = spawn(cmd, log_path, cwd=wan_dir, env=env)
    wan = WanProcess("wan", 0, wan_dir, log_path, proc.pid, proc, scale=scale)
    try:
        ready = wait_ready_line(proc, log_path, offset, timeout, "control_url",
                                 "WAN emulator")
    except BaseException:
        wan.kill()
        raise
    wan.control_url = str(ready["control_url"])
    wan.port = int(wan.control_url.rsplit(":", 1)[1])
    return wan, list(ready["links"])


def _link_record(state: dict[str, Any]) -> dict[str, Any]:
    """A link as cluster.json lists it."""
    return {"src": state["src"], "dst": state["dst"], "service": state["service"],
            "listen_port": int(state["listen_port"]),
            "target": f"{state['target_host']}:{state['target_port']}",
            "rtt_ms": state.get("rtt_ms"), "jitter_ms": state.get("jitter_ms", 0.0)}


# --------------------------------------------------------------------------- routers


@dataclass
class RouterProcess(ServerProcess):
    """A geo router (`python -m geo_router`); `port` is its public port."""

    site: str = ""
    url: str = ""
    admin_url: str = ""
    env: dict[str, str] = field(default_factory=dict, repr=False)

    def admin(self) -> Any:
        """A client of the router's admin API (a geo_router.client.RouterAdmin)."""
        from geo_router.client import RouterAdmin

        return RouterAdmin(self.admin_url)

    def to_json(self) -> dict[str, object]:
        """What cluster.json records about this router (with its settings, for a restart)."""
        return {**super().to_json(), "site": self.site, "url": self.url,
                "admin_url": self.admin_url,
                "env": {k: v for k, v in self.env.items() if k.startswith("PAYCLUSTER_ROUTER_")}}


def router_env(data_dir: Path, site: str, extra_env: dict[str, str] | None = None
               ) -> dict[str, str]:
    """The environment of the lab's router deployed in `site`.

    Its catalog is cluster.json itself; free ports (it prints them); the overrides file
    shared by every router of the lab; clients that give no location are taken to be in
    the router's own region - in a real deployment DNS or anycast brings a client to the
    router nearest to it. `extra_env` wins (e.g. a faster probe interval in tests).
    """
    data_dir = data_dir.resolve()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PAYCLUSTER_ROUTER_CATALOG_FILE": str(data_dir / CLUSTER_FILE),
           "PAYCLUSTER_ROUTER_PORT": "0", "PAYCLUSTER_ROUTER_ADMIN_PORT": "0",
           "PAYCLUSTER_ROUTER_SITE": site,
           "PAYCLUSTER_ROUTER_DEFAULT_LOCATION": site,
           "PAYCLUSTER_ROUTER_STATE_FILE": str(data_dir / "router" / ROUTER_OVERRIDES)}
    env.update(extra_env or {})
    return env


def start_router(data_dir: Path, site: str, extra_env: dict[str, str] | None = None,
                 timeout: float = ROUTER_READY_TIMEOUT) -> RouterProcess:
    """Start a geo router labelled as deployed in region `site`; ready once it printed
    its JSON ready line (after its first probe of every region). Its files go under
    `data_dir/router/<site>/`. Killed, with ServerStartError, if it exits or times out."""
    router_dir = (data_dir / "router" / site).resolve()
    router_dir.mkdir(parents=True, exist_ok=True)
    log_path = router_dir / "router.log"
    env = router_env(data_dir, site, extra_env)
    router = RouterProcess("router", 0, router_dir, log_path, 0, site=site, env=env)
    _launch_router(router, timeout)
    return router


def _launch_router(router: RouterProcess, timeout: float) -> None:
    offset = router.log_path.stat().st_size if router.log_path.exists() else 0
    proc = spawn([sys.executable, "-m", "geo_router"], router.log_path, cwd=router.data_dir,
                 env=router.env)
    router.pid, router._popen, router.started_at = proc.pid, proc, None
    try:
        ready = wait_ready_line(proc, router.log_path, offset, timeout, "router_url",
                                 f"geo router ({router.site})")
    except BaseException:
        router.kill()
        raise
    router.url, router.admin_url = str(ready["router_url"]), str(ready["admin_url"])
    router.port = int(router.url.rsplit(":", 1)[1])


# --------------------------------------------------------------------------- regions


@dataclass
class Region:
    """One region of the lab: its servers, its node (once started) and its ports."""

    name: str
    servers: RegionServers
    node: NodeProcess | None = None
    api_port: int = 0
    grpc_port: int = 0
    peers: dict[str, str] = field(default_factory=dict)
    # Where other regions reach this region's PostgreSQL: its TLS gateway (cluster.pg_tls).
    pg_gateway_port: int = 0

    @property
    def api_url(self) -> str:
        """Base URL of this region's REST API."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def dsn(self) -> str:
        """libpq URL of the region's ledger database (the operator's direct access)."""
        return self.servers.postgres.dsn("paycluster")

    def processes(self) -> list[ServerProcess]:
        """Every process of the region, in stop order (node first, store last)."""
        return ([self.node] if self.node is not None else []) + self.servers.all()

    def stop(self) -> None:
        """Stop the node first (so it drains against live servers), then the servers."""
        if self.node is not None:
            with contextlib.suppress(Exception):
                self.node.stop()
        self.servers.stop()

    def to_json(self) -> dict[str, object]:
        """This region's entry in cluster.json."""
        entry: dict[str, object] = {
            "api_url": self.api_url,
            "api_port": self.api_port,
            "grpc_port": self.grpc_port,
            "pg_gateway_port": self.pg_gateway_port,
            "peers": dict(self.peers),
            "postgres_dsn": self.dsn,
            "redis_url": self.servers.redis.url,
            "nats_url": self.servers.nats.url,
            **{kind: _with_start_time(cast(dict[str, object], value))
               for kind, value in self.servers.to_json().items()},
        }
        if self.node is not None:
            node = self.node.to_json()
            # Only our own settings: enough to restart the node from another process.
            node["env"] = {k: v for k, v in self.node.env.items()
                           if k.startswith("PAYCLUSTER_") and k not in CHANNEL_SECRET_ENV}
            entry["node"] = _with_start_time(node)
        return entry


@dataclass
class Cluster:
    """A running lab; `stop()` stops everything it started. Usable as a context manager."""

    data_dir: Path
    regions: list[Region] = field(default_factory=list)
    wan: WanProcess | None = None
    # The TLS gateways that carry replication between the regions (cluster.pg_tls).
    pg_tls: GatewayProcess | None = None
    links: list[dict[str, Any]] = field(default_factory=list)
    wan_scale: float = 1.0
    extra_env: dict[str, str] = field(default_factory=dict)
    routers: list[RouterProcess] = field(default_factory=list)
    # The acquirer simulator every region's node reaches for pay-ins and payouts (one
    # shared channel for the lab, like one acquirer contract for the company).
    channel: ChannelServer | None = None
    # PAYCLUSTER_ROUTER_* given to every router on top of the lab's (see router_env).
    router_env: dict[str, str] = field(default_factory=dict)
    detached: bool = False
    # The foreground process that owns the processes (stops them when it exits); None when
    # detached. Kept as is by other processes that attach to the cluster.
    owner_pid: int | None = None
    # The bootstrap admin's API key (made at start, shown in cluster.json, mode 0600).
    admin_key: str = ""
    # The geo routers' key (principal ROUTER_PRINCIPAL, not an admin; see router_key).
    router_key: str = ""
    # What cluster.json says: starting, running, changing (a region is being added: a node
    # restarting then is expected, not a failure) or stopped.
    status: str = "starting"
    # Durability per region, {"mode": local|regional, "buddy": region|None} (see
    # cluster.durability); what the lab set, kept across restarts of its data dir.
    durability: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    stopping: bool = field(default=False, repr=False)
    """Set when `stop` begins: a step still running in another thread (a drill that was
    interrupted during a rejoin) must not start a server the stop has already passed."""

    @property
    def cluster_file(self) -> Path:
        """Where this cluster's cluster.json lives."""
        return self.data_dir / CLUSTER_FILE

    @property
    def names(self) -> list[str]:
        """Region names, in start order."""
        return [r.name for r in self.regions]

    def region(self, name: str) -> Region:
        """The region called `name`."""
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(name)

    def auth_headers(self) -> dict[str, str]:
        """`Authorization: Bearer <admin key>` for calls to the /v1 API."""
        if not self.admin_key:
            raise ClusterError("this cluster has no admin key (cluster.json is too old)")
        return {"Authorization": f"Bearer {self.admin_key}"}

    @property
    def router_url(self) -> str:
        """Public URL of the lab's first geo router; ClusterError if it runs none."""
        if not self.routers:
            raise ClusterError("this cluster runs no geo router (start it with routers=1)")
        return self.routers[0].url

    def start_router(self, site: str | None = None,
                     timeout: float = ROUTER_READY_TIMEOUT) -> RouterProcess:
        """Start one more geo router, labelled as deployed in `site` (default: the first
        region without one); record it."""
        taken = {r.site for r in self.routers}
        site = site or next((n for n in self.names if n not in taken), self.names[0])
        if site in taken:
            raise ClusterError(f"a router already runs for {site}")
        router = start_router(self.data_dir, site, self.router_env, timeout)
        with self._lock:
            self.routers.append(router)
        self.write()
        return router

    def reload_routers(self) -> None:
        """Make every router re-read the catalog (cluster.json), e.g. after a region joined.

        A router that does not answer is logged, not fatal: it reads the catalog again
        when it restarts.
        """
        for router in list(self.routers):
            try:
                with router.admin() as admin:
                    admin.reload()
            except Exception as exc:
                log.warning("router %s did not reload its catalog: %s", router.site, exc)

    def wan_control(self) -> WanControl:
        """A client of the WAN emulator's control API; ClusterError in a 1-region lab."""
        if self.wan is None:
            raise ClusterError("this cluster has no WAN emulator (a single region)")
        return self.wan.control()

    def link_port(self, src: str, dst: str, service: str) -> int:
        """Local port of the WAN link on which clients in `src` reach `dst`'s `service`."""
        for link in self.links:
            if (link["src"], link["dst"], link["service"]) == (src, dst, service):
                return int(link["listen_port"])
        raise KeyError(f"no {service} link {src} -> {dst}")

    def peers_of(self, name: str) -> dict[str, str]:
        """PAYCLUSTER_PEERS of region `name`: every other region's gRPC via the WAN link."""
        return {other.name: f"127.0.0.1:{self.link_port(name, other.name, 'grpc')}"
                for other in self.regions if other.name != name}

    def region_handles(self) -> dict[str, Any]:
        """Every region as the failover guard sees it (`replication.failover.RegionHandle`:
        its name, API and store), by name."""
        from replication.failover import RegionHandle

        return {r.name: RegionHandle(r.name, r.api_url, r.dsn) for r in self.regions}

    def region_dbs(self) -> dict[str, Any]:
        """Every region as replication.wiring sees it: its DSN, and where each other region
        reaches its PostgreSQL: the subscriber's TLS gateway to it (cluster.pg_tls), which
        crosses the postgres WAN link; subscriptions log in as the replication role."""
        from replication.tls import REPLICATION_ROLE
        from replication.wiring import RegionDb

        gateway = self.pg_tls

        def reach(src: str, dst: str) -> tuple[str, int]:
            if gateway is None:  # a lab recorded before the gateways existed
                return "127.0.0.1", self.link_port(src, dst, "postgres")
            return "127.0.0.1", gateway.client_port(src, dst)

        return {r.name: RegionDb(r.name, r.dsn, reach={
                    o.name: reach(o.name, r.name) for o in self.regions if o.name != r.name},
                    replication_user=REPLICATION_ROLE if gateway is not None else "postgres")
                for r in self.regions}

    def gateway_specs(self) -> tuple[list[ServerSpec], list[ClientSpec]]:
        """The TLS gateways of the lab: one server gateway per region (its PostgreSQL's
        socket), one client gateway per ordered region pair (through the postgres WAN
        link); client ports already in use are kept, new ones (0) picked by the kernel."""
        kept: dict[tuple[str, str], int] = {}
        if self.pg_tls is not None:
            kept = {(c.src, c.dst): c.port for c in load_gateway_config(
                Path(self.pg_tls.config))[1]}
        files = {r.name: region_tls_files(self.data_dir, r.name) for r in self.regions}
        servers_ = [ServerSpec(r.name, r.pg_gateway_port, str(r.servers.postgres.socket_path),
                               str(files[r.name].ca_file), str(files[r.name].cert_file),
                               str(files[r.name].key_file)) for r in self.regions]
        clients = [ClientSpec(src.name, dst.name, kept.get((src.name, dst.name), 0),
                              "127.0.0.1", self.link_port(src.name, dst.name, "postgres"),
                              files[dst.name].name, str(files[src.name].ca_file),
                              str(files[src.name].cert_file), str(files[src.name].key_file))
                   for src in self.regions for dst in self.regions if src is not dst]
        return servers_, clients

    def restart_gateways(self) -> None:
        """(Re)start the TLS gateways for the current regions; live replication connections
        drop and reconnect within a second (wal_retrieve_retry_interval)."""
        servers_, clients = self.gateway_specs()
        if self.pg_tls is not None:
            self.pg_tls.stop()
        self.pg_tls = start_gateways(self.data_dir, servers_, clients)
        self.write()

    def lock_urls_of(self, name: str) -> dict[str, str]:
        """PAYCLUSTER_LOCK_REDIS_URLS of region `name`: its own Redis directly, every other
        region's through the redis WAN link (the lock quorum crosses the WAN like the rest)."""
        return {other.name: (other.servers.redis.url if other.name == name else
                             f"redis://127.0.0.1:{self.link_port(name, other.name, 'redis')}/0")
                for other in self.regions}

    def _node_extra_env(self, region: Region) -> dict[str, str]:
        env = {"PAYCLUSTER_GRPC_PORT": str(region.grpc_port),
               "PAYCLUSTER_PEERS": json.dumps(region.peers),
               # Mutual TLS on gRPC with the region's certificate (cluster.pki).
               **region_tls_files(self.data_dir, region.name).node_env(sorted(region.peers))}
        if self.wan is not None:
            env["PAYCLUSTER_LOCK_REDIS_URLS"] = json.dumps(self.lock_urls_of(region.name))
        if self.channel is not None:
            env.update(channel_node_env(self.channel, region.api_port))
        env.update(self.extra_env)
        return env

    def check_running(self) -> None:
        """ClusterError once `stop` has begun (see `stopping`)."""
        if self.stopping:
            raise ClusterError(f"the lab in {self.data_dir} is stopping")

    def start_node(self, name: str, timeout: float = READY_TIMEOUT) -> NodeProcess:
        """Start region `name`'s node with the cluster's current peers; record it."""
        self.check_running()
        region = self.region(name)
        region.peers = self.peers_of(name) if self.wan is not None else {}
        region.node = start_node(name, region.servers, self.data_dir, api_port=region.api_port,
                                 extra_env=self._node_extra_env(region), timeout=timeout)
        self.write()
        self._stop_if_stopping(region.node)
        return region.node

    def _stop_if_stopping(self, proc: Any) -> None:
        """A process started while `stop` began: stop it too, and say so."""
        if self.stopping:
            with contextlib.suppress(Exception):
                proc.stop()
            self.check_running()

    def restart_node(self, name: str, crash: bool = False,
                     timeout: float = READY_TIMEOUT) -> NodeProcess:
        """Restart region `name`'s node on the same ports (SIGKILL first if `crash`), with
        the cluster's current peers, and record its new pid in cluster.json."""
        region = self.region(name)
        node = region.node
        if node is None:
            return self.start_node(name, timeout)
        self.check_running()
        if crash:
            node.kill()
        region.peers = self.peers_of(name) if self.wan is not None else {}
        node.env = node_env(name, region.servers, region.api_port,
                            self._node_extra_env(region))
        node.restart(timeout)
        self.write()
        self._stop_if_stopping(node)
        return node

    def add_region(self, name: str, timeout: float = 120.0) -> Region:
        """Bring a new, empty region into this running cluster (see `add_region`)."""
        return _add_region(self, name, timeout)

    def write(self, status: str | None = None) -> None:
        """(Re)write cluster.json atomically, e.g. after a node restart changed its pid;
        `status` (if given) becomes the cluster's status."""
        with self._lock:
            if status is not None:
                self.status = status
            doc = {
                "version": SCHEMA_VERSION,
                "status": self.status,
                # Who is changing the cluster (status "changing"), so that a second change
                # waits its turn but a crashed one does not lock the cluster forever.
                "changed_by": os.getpid() if self.status == "changing" else None,
                "data_dir": str(self.data_dir),
                "updated_at": datetime.now(UTC).isoformat(),
                # The foreground `up` that owns the processes; None when detached.
                "owner_pid": self.owner_pid,
                # The bootstrap admin key: this file is written with mode 0600.
                "admin_key": self.admin_key,
                # The geo routers' (non-admin) key; they re-read it from this file.
                "router_key": self.router_key,
                "wan_scale": self.wan_scale,
                "extra_env": dict(self.extra_env),
                "regions": {r.name: r.to_json() for r in self.regions},
                "wan": _with_start_time(self.wan.to_json()) if self.wan is not None else None,
                "pg_tls": (_with_start_time(self.pg_tls.to_json()) if self.pg_tls is not None
                           else None),
                "links": list(self.links),
                "router_env": dict(self.router_env),
                "routers": [_with_start_time(r.to_json()) for r in self.routers],
                "channel": (_with_start_time(self.channel.to_json())
                            if self.channel is not None else None),
                "durability": {k: dict(v) for k, v in self.durability.items()},
            }
            _write_json(self.cluster_file, doc)

    def adopt_recorded(self) -> None:
        """Take the node and PostgreSQL that cluster.json records for each region where
        another handle of this lab (the CLI, in this process or another) restarted them:
        this handle's next `write` would otherwise record the dead processes over the live
        ones, and `stop` would leave those running."""
        entries = read_cluster(self.data_dir).get("regions", {})
        with self._lock:
            for region in self.regions:
                entry = entries.get(region.name)
                if not isinstance(entry, dict):
                    continue
                recorded = _region_from_json(region.name, entry, self)
                if recorded.node is not None and (region.node is None
                                                  or recorded.node.pid != region.node.pid):
                    region.node = recorded.node
                if recorded.servers.postgres.pid != region.servers.postgres.pid:
                    region.servers.postgres = recorded.servers.postgres

    def stop(self) -> None:
        """Stop every node, then the WAN emulator, then every region's servers; then
        anything else cluster.json lists (added by another process); mark it stopped."""
        with self._lock:
            self.stopping = True
            regions = list(reversed(self.regions))
            wan = self.wan
            gateway = self.pg_tls
            routers = list(self.routers)
            channel = self.channel
        # Routers first: clients stop reaching the nodes before the nodes go away.
        _run_parallel(_quietly(RouterProcess.stop), routers, "router-stop")
        _run_parallel(_quietly(NodeProcess.stop),
                      [r.node for r in regions if r.node is not None], "node-stop")
        if wan is not None:
            _quietly(WanProcess.stop)(wan)
        if channel is not None:
            _quietly(ChannelServer.stop)(channel)
        if gateway is not None:
            _quietly(GatewayProcess.stop)(gateway)
        _run_parallel(_quietly(Region.stop), regions, "region-stop")
        with contextlib.suppress(ClusterError, OSError):
            stop_cluster(self.data_dir)
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @classmethod
    def load(cls, data_dir: Path) -> Cluster:
        """Attach to the running lab that `data_dir`'s cluster.json describes.

        The processes are not our children: they are identified by pid and start time,
        and `stop()` / `restart_node` act on them by pid like on our own.
        """
        doc = read_cluster(data_dir)
        changer = doc.get("changed_by")
        if (doc.get("status") == "changing" and isinstance(changer, int)
                and changer != os.getpid() and psutil.pid_exists(changer)):
            raise ClusterError(f"the cluster in {data_dir.resolve()} is being changed by "
                               f"pid {changer}; try again when it is done")
        if doc.get("status") not in ("running", "starting", "changing"):
            raise ClusterError(f"the cluster in {data_dir.resolve()} is {doc.get('status')}")
        cluster = cls(Path(doc["data_dir"]), wan_scale=float(doc.get("wan_scale", 1.0)),
                      extra_env=dict(doc.get("extra_env") or {}),
                      router_env=dict(doc.get("router_env") or {}),
                      links=list(doc.get("links") or []),
                      detached=doc.get("owner_pid") is None, status="running",
                      owner_pid=doc.get("owner_pid"),
                      admin_key=str(doc.get("admin_key") or ""),
                      router_key=str(doc.get("router_key") or ""),
                      durability=dict(doc.get("durability") or {}))
        wan = doc.get("wan")
        if isinstance(wan, dict):
            cluster.wan = WanProcess("wan", int(wan["port"]), Path(wan["data_dir"]),
                                     Path(wan["log"]), int(wan["pid"]),
                                     started_at=wan.get("started_at"),
                                     control_url=str(wan["control_url"]),
                                     scale=float(wan.get("scale", cluster.wan_scale)))
        gateway = doc.get("pg_tls")
        if isinstance(gateway, dict):
            cluster.pg_tls = GatewayProcess("pg_tls", **_proc_args(gateway),
                                            config=str(gateway.get("config") or ""))
        for name, entry in doc.get("regions", {}).items():
            cluster.regions.append(_region_from_json(name, entry, cluster))
        channel = doc.get("channel")
        if isinstance(channel, dict):
            cluster.channel = channel_from_json(channel)
        for entry in doc.get("routers") or []:
            cluster.routers.append(RouterProcess(
                "router", **_proc_args(entry), site=str(entry.get("site") or ""),
                url=str(entry.get("url") or ""), admin_url=str(entry.get("admin_url") or ""),
                env={**os.environ, **dict(entry.get("env") or {})}))
        return cluster


def _proc_args(entry: dict[str, Any]) -> dict[str, Any]:
    return {"port": int(entry["port"]), "data_dir": Path(entry["data_dir"]),
            "log_path": Path(entry["log"]), "pid": int(entry["pid"]),
            "started_at": entry.get("started_at")}


def _region_from_json(name: str, entry: dict[str, Any], cluster: Cluster) -> Region:
    servers = RegionServers(
        name,
        PostgresServer("postgres", **_proc_args(entry["postgres"])),
        RedisServer("redis", **_proc_args(entry["redis"])),
        NatsServer("nats", **_proc_args(entry["nats"]),
                   monitor_port=int(entry["nats"].get("monitor_port", 0))))
    region = Region(name, servers, api_port=int(entry["api_port"]),
                    grpc_port=int(entry.get("grpc_port") or 0),
                    peers=dict(entry.get("peers") or {}),
                    pg_gateway_port=int(entry.get("pg_gateway_port") or 0))
    node = entry.get("node")
    if isinstance(node, dict):
        extra = {**dict(node.get("env") or {}), **cluster.extra_env}
        region.node = NodeProcess("node", **_proc_args(node), region=name,
                                  env=node_env(name, servers, region.api_port, extra))
    return region


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    # Write-then-rename so a reader never sees half a file. The file holds the admin key:
    # the temporary file is created with mode 0600 (never readable by others, not even
    # for a moment), and the rename keeps that mode.
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- channel

CHANNEL_SECRET_ENV = ("PAYCLUSTER_CHANNEL_API_KEY", "PAYCLUSTER_CHANNEL_CALLBACK_SECRET")
"""Node settings that are the channel's keys: read from its secrets.json (mode 0600) when
a node starts, never written to cluster.json."""

LAB_CHANNEL_TIMINGS = {
    # The lab's compensation job in seconds, not the production five minutes.
    "PAYCLUSTER_CHANNEL_COMPENSATION_SECONDS": "5",
    "PAYCLUSTER_CHANNEL_STUCK_AFTER_SECONDS": "15",
    "PAYCLUSTER_CHANNEL_RETRY_SCHEDULE_SECONDS": "[10, 30, 60]",
    "PAYCLUSTER_CHANNEL_BREAKER_OPEN_SECONDS": "10",
}


def start_lab_channel(data_dir: Path) -> ChannelServer:
    """The lab's channel under `<data_dir>/channel`, recorded in its channel.json too, so
    `paycluster channel faults|down|up|statement -d DIR` operate the lab's channel."""
    from cluster.channel_cli import STATE_FILE

    folder = (data_dir / "channel").resolve()
    server = start_channel(folder)
    record = {**server.to_json(), "started_at": psutil.Process(server.pid).create_time()}
    (folder / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return server


def channel_from_json(entry: dict[str, Any]) -> ChannelServer:
    """The lab's channel as cluster.json records it (its keys from its secrets.json)."""
    server = ChannelServer("channel", int(entry["port"]), Path(str(entry["data_dir"])),
                           Path(str(entry["log"])), int(entry["pid"]),
                           started_at=entry.get("started_at"),
                           admin_port=int(entry.get("admin_port") or 0))
    with contextlib.suppress(OSError, ValueError):
        keys = json.loads((server.data_dir / "secrets.json").read_text())
        server.api_key = str(keys.get("api_key", ""))
        server.admin_key = str(keys.get("admin_key", ""))
        server.callback_secret = str(keys.get("callback_secret", ""))
    return server


def channel_node_env(channel: ChannelServer, api_port: int) -> dict[str, str]:
    """PAYCLUSTER_CHANNEL_* of a lab node: where the channel is, its keys, where it calls
    the node back, and the lab's timings."""
    return {"PAYCLUSTER_CHANNEL_URL": channel.url,
            "PAYCLUSTER_CHANNEL_API_KEY": channel.api_key,
            "PAYCLUSTER_CHANNEL_CALLBACK_SECRET": channel.callback_secret,
            "PAYCLUSTER_CHANNEL_CALLBACK_URL":
                f"http://127.0.0.1:{api_port}/v1/channel/callbacks",
            **LAB_CHANNEL_TIMINGS}


def _with_start_time(entry: dict[str, object]) -> dict[str, object]:
    """Add the process start time, so a reused pid is never mistaken for ours."""
    pid = entry.get("pid")
    started = entry.get("started_at")
    if isinstance(pid, int) and pid > 0:
        with contextlib.suppress(psutil.Error):
            started = psutil.Process(pid).create_time()
    return {**entry, "started_at": started}


# --------------------------------------------------------------------------- parallel steps


def _quietly(fn: Callable[[_T], object]) -> Callable[[_T], None]:
    """`fn` that logs instead of raising: one failed stop must not leave the rest running."""
    def run(item: _T) -> None:
        try:
            fn(item)
        except Exception:
            log.exception("stopping %r failed", item)
    return run


def _wait_all(futures: Sequence[Future[Any]]) -> None:
    while True:
        try:
            wait(futures)
            return
        except KeyboardInterrupt:
            # Already cleaning up: giving up now would leak the processes still starting.
            continue


def _run_parallel(fn: Callable[[_T], _R], items: Sequence[_T], name: str,
                  on_done: Callable[[_R], None] | None = None) -> list[_R]:
    """Run `fn` on every item in threads; `on_done` sees each result as it arrives.

    On the first failure (or Ctrl-C) the others are still waited for - each is bounded by
    its own timeouts - and every success is still handed to `on_done` (so the caller can
    stop what was started) before the error propagates.
    """
    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=len(items), thread_name_prefix=name)
    futures = [pool.submit(fn, item) for item in items]
    seen: set[int] = set()
    try:
        for future in as_completed(futures):
            seen.add(id(future))
            result = future.result()
            if on_done is not None:
                on_done(result)
    except BaseException:
        _wait_all(futures)
        for future in futures:
            if id(future) not in seen and future.exception() is None and on_done is not None:
                with contextlib.suppress(Exception):
                    on_done(future.result())
        raise
    finally:
        pool.shutdown(wait=True)
    return [f.result() for f in futures]


# --------------------------------------------------------------------------- start


def _migrate(dsn: str) -> None:
    from region_node.migrate import upgrade

    upgrade(dsn)


def provision_lock_servers(redis_urls: list[str]) -> None:
    """Tell the lock service these Redis servers are new, so they grant locks at once.

    Only right after they were created: a Redis that restarts empty later must sit out
    the lock service's quarantine (see lock_service.quorum), and nothing here calls this
    for a restart.
    """
    from lock_service.quorum import LockService

    async def provision() -> None:
        service = LockService(redis_urls)
        try:
            await service.provision_new_servers()
        finally:
            await service.aclose()

    asyncio.run(provision())


def start_cluster(data_dir: Path, regions: int = 3, wan_scale: float = 1.0,
                  detach: bool = False, extra_env: dict[str, str] | None = None,
                  routers: int = 0, router_env: dict[str, str] | None = None,
                  durability: str | None = None, buddies: dict[str, str] | None = None,
                  ) -> Cluster:
    """Start `regions` regions under `data_dir`, wired through one WAN emulator; write
    cluster.json (see the module docstring for the order).

    Regions are named from REGION_NAMES. `wan_scale` multiplies the default round-trip
    table (0 = no delay). `extra_env` is passed to every node on top of what the lab sets
    (e.g. PAYCLUSTER_REPLICATION_SLO_SECONDS). With `regions=1` there is no WAN and no
    replication. `routers` geo routers are started last (0 = none; `paycluster up` starts
    one), router i labelled as deployed in region i; `router_env` is passed to each (e.g.
    PAYCLUSTER_ROUTER_PROBE_INTERVAL_SECONDS). If anything fails (or we are interrupted),
    every process already started is stopped before the error propagates. With
    `detach=False` the caller owns the processes: they are also stopped when this
    interpreter exits normally. With `detach=True` they outlive us and cluster.json is the
    handle to stop them (`stop_cluster`).

    `durability` (``local`` or ``regional``) is every region's durability mode, set right
    after replication is wired and before the nodes start; None re-uses what `data_dir`'s
    previous cluster.json recorded (``local`` for a new lab). In ``regional`` mode each
    region's buddy is the nearest other region, unless `buddies` (region -> buddy) says
    otherwise; see cluster.durability.
    """
    from cluster.durability import plan_durability

    if not 1 <= regions <= len(REGION_NAMES):
        raise ValueError(f"regions must be between 1 and {len(REGION_NAMES)}, got {regions}")
    if wan_scale < 0:
        raise ValueError(f"wan_scale must be >= 0, got {wan_scale}")
    if not 0 <= routers <= regions:
        raise ValueError(f"routers must be between 0 and {regions} (one per region at "
                         f"most), got {routers}")
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    alive = running_pids(data_dir)
    if alive:
        raise ClusterError(f"a cluster is already running in {data_dir} (pids "
                           f"{', '.join(map(str, alive))}); stop it with `paycluster down`")
    names = REGION_NAMES[:regions]
    recorded: dict[str, Any] = {}
    with contextlib.suppress(ClusterError):
        recorded = dict(read_cluster(data_dir).get("durability") or {})
    plan = plan_durability(names, durability, buddies, recorded)
    cluster = Cluster(data_dir, wan_scale=wan_scale, extra_env=dict(extra_env or {}),
                      router_env=dict(router_env or {}), durability=plan,
                      detached=detach, owner_pid=None if detach else os.getpid())
    try:
        _start_all(cluster, names, routers)
    except BaseException:
        cluster.stop()
        raise
    if not detach:
        atexit.register(cluster.stop)
    return cluster


def _start_all(cluster: Cluster, names: Sequence[str], routers: int = 0) -> None:
    def record(region: Region) -> None:
        # Recorded as soon as it is up, so cluster.json lists its pids even if we die
        # before the others are.
        with cluster._lock:
            cluster.regions.append(region)
        cluster.write()

    # Secure by default: every lab has its CA and region certificates (reused on restart),
    # and its PostgreSQL admits replication only through the TLS gateways.
    ensure_cluster_pki(cluster.data_dir, list(names))
    # A lab restarted on its data dir keeps its admin key if its store still honours it
    # (bootstrap_admin checks): read it before this start rewrites cluster.json.
    with contextlib.suppress(ClusterError, OSError, ValueError):
        previous = read_cluster(cluster.data_dir)
        cluster.admin_key = str(previous.get("admin_key") or "")
        cluster.router_key = str(previous.get("router_key") or "")

    def servers_of(name: str) -> Region:
        return Region(name, start_region_servers(name, cluster.data_dir, gateway=True))

    step = _Steps()
    _run_parallel(servers_of, names, "region-start", on_done=record)
    step.done("servers of %d region(s)", len(names))
    cluster.regions.sort(key=lambda r: names.index(r.name))
    multi = len(names) > 1
    for region in cluster.regions:
        region.api_port = free_port()
        region.grpc_port = free_port() if multi else 0
        region.pg_gateway_port = free_port() if multi else 0
    if multi:
        targets = {r.name: _service_ports(r) for r in cluster.regions}
        pairs = [(a, b) for a in names for b in names if a != b]
        cluster.wan, states = start_wan(cluster.data_dir, _wan_specs(pairs, targets,
                                                                     cluster.wan_scale),
                                        cluster.wan_scale)
        cluster.links = [_link_record(s) for s in states]
        cluster.write()
        step.done("WAN emulator with %d links", len(cluster.links))
        cluster.restart_gateways()
        step.done("TLS gateways for replication")
    if multi:
        from cluster.durability import release_standbys

        # A re-used store may still name a synchronous standby: nothing below may wait.
        release_standbys({r.name: r.servers.postgres.dsn("postgres") for r in cluster.regions})
    for region in cluster.regions:
        _migrate(region.dsn)
    step.done("migrations")
    provision_lock_servers([r.servers.redis.url for r in cluster.regions])
    if multi:
        from replication.wiring import wire_cluster

        wire_cluster(cluster.region_dbs())
        step.done("replication wired")
        from cluster.durability import apply_plan

        apply_plan(cluster.durability, {r.name: r.dsn for r in cluster.regions})
        step.done("durability %s", ", ".join(
            f"{n} {d['mode']}" + (f" -> {d['buddy']}" if d["buddy"] else "")
            for n, d in cluster.durability.items()))
    cluster.admin_key = bootstrap_admin(cluster)
    cluster.router_key = router_key(cluster)
    cluster.write()
    step.done("bootstrap admin and geo router keys, replicated to every region")
    cluster.channel = start_lab_channel(cluster.data_dir)
    cluster.write()
    step.done("channel (acquirer simulator) at %s", cluster.channel.url)
    for region in cluster.regions:
        region.peers = cluster.peers_of(region.name) if multi else {}
    _run_parallel(lambda r: cluster.start_node(r.name), cluster.regions, "node-start")
    step.done("nodes ready")
    # cluster.json must list every node before a router reads it as its catalog.
    cluster.write()
    _run_parallel(cluster.start_router, list(names[:routers]), "router-start")
    with cluster._lock:  # in region order, not in the order they happened to be ready
        cluster.routers.sort(key=lambda r: names.index(r.site) if r.site in names else 0)
    if routers:
        step.done("%d geo router(s) ready", routers)
    cluster.write(status="running")


def bootstrap_admin(cluster: Cluster, timeout: float = 60.0) -> str:
    """Create the bootstrap admin principal and its key in the FIRST region's store (after
    replication is wired, before any node runs) and wait until every region has both
    rows, so the key works everywhere from the start. Returns the key. A lab restarted
    on its data dir keeps `cluster.admin_key` if the store still honours it."""
    return _lab_key(cluster, cluster.admin_key, "bootstrap-admin", "admin",
                    "bootstrap admin", timeout)


def router_key(cluster: Cluster, timeout: float = 60.0) -> str:
    """The geo routers' API key: principal ROUTER_PRINCIPAL with role customer (least
    privilege: a router only reads `GET /v1/cluster/ownership`, open to any principal),
    created like the bootstrap admin in the FIRST region's store and awaited in every
    region. A lab restarted on its data dir keeps `cluster.router_key` if the store still
    honours it as that principal's unrevoked key."""
    return _lab_key(cluster, cluster.router_key, ROUTER_PRINCIPAL, "customer", "geo router",
                    timeout)


def _lab_key(cluster: Cluster, key: str | None, name: str, role: str, what: str,
             timeout: float) -> str:
    """`key` if the first region's store still has it as an unrevoked key of principal
    `name` with `role` (a restart on the same data dir), else a new principal and key
    created there; either way awaited in every region."""
    first = cluster.regions[0]
    others = {r.name: r.dsn for r in cluster.regions[1:]}
    return ensure_principal_key(first.name, first.dsn, others, key, name, role, what, timeout)


def ensure_principal_key(first_region: str, first_dsn: str, others: dict[str, str],
                         key: str | None, name: str, role: str, what: str,
                         timeout: float) -> str:
    """`key` if the store at `first_dsn` still has it as an unrevoked key of principal
    `name` with `role`, else a new principal with `role` and its key created there (homed
    in `first_region`); either way awaited in every region of `others` (name -> DSN).
    Shared by the lab and by `paycluster deploy bootstrap` (containers)."""
    import psycopg

    from region_node.principals import create_principal_sync, hash_key

    with psycopg.connect(first_dsn, autocommit=True) as conn:
        kept = conn.execute(
            "select k.id from api_keys k join principals p on p.id = k.principal_id "
            "where k.hash = %s and p.name = %s and p.role = %s and not exists "
            "(select 1 from api_key_revocations r where r.key_id = k.id)",
            (hash_key(key), name, role)).fetchone() if key else None
    if kept is not None and key:
        key_id = kept[0]
    else:
        made = create_principal_sync(first_dsn, first_region, name, role)
        key, key_id = made.key, made.key_id
    _await_key_everywhere(others, key_id, what, timeout)
    return key


def _await_key_everywhere(others: dict[str, str], key_id: Any, what: str,
                          timeout: float) -> None:
    """Wait until the key `key_id` and its principal replicated to every region of
    `others` (name -> DSN)."""
    import psycopg

    deadline = time.monotonic() + timeout
    for name, dsn in others.items():
        while True:
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute(
                    "select 1 from api_keys k join principals p on p.id = k.principal_id "
                    "where k.id = %s", (key_id,)).fetchone()
            if row is not None:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"the {what} key did not replicate to "
                                   f"{name} within {timeout:.0f}s")
            time.sleep(0.1)


class _Steps:
    """Logs how long each start step took (logger cluster.lab, INFO)."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def done(self, what: str, *args: object) -> None:
        now = time.monotonic()
        log.info(what + " in %.2fs", *args, now - self._last)
        self._last = now


def _service_ports(region: Region) -> dict[str, int]:
    # PostgreSQL is reached across the WAN only through the region's TLS gateway.
    return {"postgres": region.pg_gateway_port or region.servers.postgres.port,
            "grpc": region.grpc_port,
            "redis": region.servers.redis.port}


# --------------------------------------------------------------------------- add a region


def add_region(data_dir: Path, name: str, timeout: float = 120.0) -> Region:
    """Bring a new region into the running lab of `data_dir` (a `paycluster region add`).

    Starts the region's servers, adds WAN links to and from every region, migrates its
    database, joins it to replication (`replication.join.add_region`: one copy of all
    data from a donor region, then streams from everyone), starts its node, and restarts
    every existing node, one at a time, so that it knows the new peer. cluster.json
    records every step. On failure the new region's processes are stopped (its WAN links
    stay, pointing at nothing) and the error propagates.
    """
    return _add_region(Cluster.load(data_dir), name, timeout)


def _add_region(cluster: Cluster, name: str, timeout: float) -> Region:
    from region_node.regions import DEFAULT_REGION_CODES

    if name in cluster.names:
        raise ClusterError(f"region {name} is already part of the cluster")
    if name not in DEFAULT_REGION_CODES:
        raise ClusterError(f"unknown region {name!r}; known: "
                           f"{', '.join(sorted(DEFAULT_REGION_CODES))}")
    missing = [r.name for r in cluster.regions if r.node is None or not r.node.is_running()]
    if missing:
        raise ClusterError(f"the nodes of {', '.join(missing)} are not running")
    for known in cluster.names:
        link_rtt(name, known)  # a ValueError now rather than after starting servers
    ensure_cluster_pki(cluster.data_dir, [name])
    region = Region(name, start_region_servers(name, cluster.data_dir, gateway=True),
                    api_port=free_port(), grpc_port=free_port(), pg_gateway_port=free_port())
    provision_lock_servers([region.servers.redis.url])  # brand new, never granted a lock
    existing = list(cluster.regions)
    with cluster._lock:
        cluster.regions.append(region)
    cluster.write(status="changing")
    try:
        if cluster.wan is None:
            cluster.wan, _ = start_wan(cluster.data_dir, [], cluster.wan_scale)
            cluster.write()
        for other in existing:
            if not other.grpc_port:
                other.grpc_port = free_port()
            if not other.pg_gateway_port:
                other.pg_gateway_port = free_port()
        targets = {r.name: _service_ports(r) for r in cluster.regions}
        pairs = [p for o in existing for p in ((o.name, name), (name, o.name))]
        with cluster.wan_control() as wan:
            for spec in _wan_specs(pairs, targets, cluster.wan_scale):
                state = wan.add(spec["src"], spec["dst"], spec["service"], spec["target_host"],
                                spec["target_port"], rtt_ms=spec["rtt_ms"])
                cluster.links.append(_link_record(state))
        cluster.write()
        cluster.restart_gateways()
        from replication import join, wiring

        _migrate(region.dsn)
        dbs = cluster.region_dbs()
        for other in existing:
            # A lab started with one region never published; the new region copies from it.
            wiring.create_publication(other.dsn)
        join.add_region([dbs[o.name] for o in existing], dbs[name], timeout_seconds=timeout)
        cluster.start_node(name)
    except BaseException:
        with cluster._lock:
            cluster.regions.remove(region)
        region.stop()
        cluster.write(status="running")
        raise
    try:
        # Rolling: one region at a time is briefly without its node, never all of them.
        for other in existing:
            cluster.restart_node(other.name)
    finally:
        cluster.write(status="running")
        # The routers read cluster.json: now it lists the new region, route to it too.
        cluster.reload_routers()
    return region


# --------------------------------------------------------------------------- read and stop


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


# Stop order within a region once the nodes are gone: the store last.
_SERVER_KINDS = ("nats", "redis", "postgres")


def _processes(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(region, kind, entry) for every process cluster.json lists, in stop order: every
    router (its site as region), every node, then the WAN emulator (region "wan"), then
    every region's servers."""
    for entry in doc.get("routers") or []:
        if isinstance(entry, dict) and isinstance(entry.get("pid"), int):
            yield str(entry.get("site") or "router"), "router", entry
    regions = list(reversed(list(doc.get("regions", {}).items())))
    for kinds in (("node",), None, _SERVER_KINDS):
        if kinds is None:
            wan = doc.get("wan")
            if isinstance(wan, dict) and isinstance(wan.get("pid"), int):
                yield "wan", "wan", wan
            gateway = doc.get("pg_tls")
            if isinstance(gateway, dict) and isinstance(gateway.get("pid"), int):
                yield "pg_tls", "pg_tls", gateway
            channel = doc.get("channel")
            if isinstance(channel, dict) and isinstance(channel.get("pid"), int):
                yield "channel", "channel", channel
            continue
        for region_name, region in regions:
            for kind in kinds:
                entry = region.get(kind)
                if isinstance(entry, dict) and isinstance(entry.get("pid"), int):
                    yield region_name, kind, entry


def running_pids(data_dir: Path) -> list[int]:
    """Pids from `data_dir`'s cluster.json that are still alive and ours ([] if none)."""
    try:
        doc = read_cluster(data_dir)
    except ClusterError:
        return []
    return [int(entry["pid"]) for _, _, entry in _processes(doc) if is_ours(entry)]


def stop_cluster(data_dir: Path, timeout: float = _STOP_TIMEOUT) -> list[tuple[str, str, int]]:
    """Stop every process `data_dir`'s cluster.json lists, by pid, and mark it stopped.

    Routers first, then nodes (in parallel), then the WAN emulator, then the servers (in
    parallel).
    Already-dead pids (and pids that now belong to someone else) are skipped. Returns
    (region, kind, pid) of the processes that were running and got stopped.
    """
    doc = read_cluster(data_dir)
    stopped: list[tuple[str, str, int]] = []
    procs = [p for p in _processes(doc) if is_ours(p[2])]

    def stop_one(item: tuple[str, str, dict[str, Any]]) -> tuple[str, str, int]:
        region_name, kind, entry = item
        # SIGINT is PostgreSQL's fast shutdown; everything else stops on SIGTERM.
        sig = signal.SIGINT if kind == "postgres" else signal.SIGTERM
        try:
            stop_pid(int(entry["pid"]), sig, timeout, started_at=entry.get("started_at"))
            if kind == "postgres":
                remove_temp_socket_dir(Path(entry["data_dir"]))
        except Exception:  # e.g. AccessDenied: report it, stop the others all the same
            log.exception("stopping %s %s (pid %s) failed", region_name, kind, entry["pid"])
        return region_name, kind, int(entry["pid"])

    for phase in (("router",), ("node",), ("wan", "pg_tls", "channel"), _SERVER_KINDS):
        batch = [p for p in procs if p[1] in phase]
        stopped += _run_parallel(stop_one, batch, "stop")
    doc["status"] = "stopped"
    doc["updated_at"] = datetime.now(UTC).isoformat()
    _write_json(data_dir.resolve() / CLUSTER_FILE, doc)
    return stopped
