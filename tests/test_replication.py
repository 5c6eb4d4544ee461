"""Multi-region replication on real PostgreSQL 18 servers: mesh wiring, heartbeats and the
convergence monitor, a cut link, an insert_exists conflict and its repair, a joining region.

Three servers of our own (four after the join test) run for the whole module; us-east's
subscription to eu-west goes through a small TCP link of this file, so the link can be
cut like a WAN partition (bytes held, connections kept) without touching the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from cluster.servers import PostgresServer, start_postgres
from region_node.ids import new_id
from region_node.migrate import upgrade
from region_node.regions import RegionCatalog
from region_node.replication_monitor import ConvergenceMonitor, HeartbeatWriter
from region_node.schema import REPLICATED_TABLES
from replication.join import add_region
from replication.repair import resolve_duplicate_key
from replication.wiring import (
    CONFLICT_COLUMNS,
    RegionDb,
    subscription_status,
    wait_until_replicating,
    wire_cluster,
)

pytestmark = [pytest.mark.multiregion, pytest.mark.integration]

REGIONS = ("us-east", "eu-west", "ap-southeast")
NEW_REGION = "us-west"
SLO = 3.0
# Failed apply workers are restarted after wal_retrieve_retry_interval (default 5 s); 1 s
# keeps the conflict test short without changing what is being tested.
PG_SETTINGS = {"wal_retrieve_retry_interval": "1s"}
CATALOG = RegionCatalog()
T = TypeVar("T")


class LinkProxy:
    """A TCP link to one server that can be cut (bytes held, as in a partition) and healed."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._up = threading.Event()
        self._up.set()
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        """Stop forwarding in both directions; connections stay open."""
        self._up.clear()

    def heal(self) -> None:
        """Forward again (what was held is delivered)."""
        self._up.set()

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._closed.set()
        self._up.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in list(self._socks):
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                if self._closed.is_set():
                    return
                continue
            self._socks += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                if not self._up.wait(0.2):
                    continue
                ready, _, _ = select.select([src], [], [], 0.2)
                if not ready or not self._up.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@dataclass
class Lab:
    """The module's servers, the wiring view of each region, and the cuttable link."""

    tmp: pytest.TempPathFactory
    servers: dict[str, PostgresServer]
    regions: dict[str, RegionDb]
    link: LinkProxy

    def start_server(self, name: str) -> PostgresServer:
        """Start one more server, stopped with the others at teardown."""
        server = start_postgres(self.tmp.mktemp(f"pg-{name}"), settings=PG_SETTINGS)
        self.servers[name] = server
        return server


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Three migrated regions wired into a mesh; us-east reaches eu-west through `link`."""
    servers: dict[str, PostgresServer] = {}
    link: LinkProxy | None = None
    try:
        with ThreadPoolExecutor(len(REGIONS)) as pool:
            futures = {name: pool.submit(start_postgres, tmp_path_factory.mktemp(f"pg-{name}"),
                                         settings=PG_SETTINGS) for name in REGIONS}
            for name, future in futures.items():
                servers[name] = future.result()
        for server in servers.values():
            upgrade(server.dsn("paycluster"))  # alembic runs are not thread-safe: one by one
        link = LinkProxy(servers["eu-west"].port)
        regions = {name: RegionDb(name, servers[name].dsn("paycluster")) for name in REGIONS}
        regions["eu-west"] = RegionDb("eu-west", servers["eu-west"].dsn("paycluster"),
                                      reach={"us-east": ("127.0.0.1", link.port)})
        wire_cluster(regions)
        for region in regions.values():
            wait_until_replicating(region.dsn, timeout_seconds=30)
        yield Lab(tmp_path_factory, servers, regions, link)
    finally:
        if link is not None:
            link.close()
        for server in servers.values():
            with contextlib.suppress(Exception):
                server.stop()


@dataclass
class Mesh:
    """Heartbeat writers and convergence monitors of every region, running on the loop."""

    engines: dict[str, AsyncEngine] = field(default_factory=dict)
    writers: dict[str, HeartbeatWriter] = field(default_factory=dict)
    monitors: dict[str, ConvergenceMonitor] = field(default_factory=dict)
    registries: dict[str, CollectorRegistry] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self, name: str, server: PostgresServer, peers: list[str]) -> None:
        """Run a writer and a monitor for region `name` (SLO 3 s, checks every 0.5 s)."""
        engine = create_async_engine(server.sqlalchemy_url("paycluster"), pool_size=2,
                                     max_overflow=2)
        registry = CollectorRegistry()
        self.engines[name], self.registries[name] = engine, registry
        self.writers[name] = HeartbeatWriter(engine, name, interval=1.0)
        self.monitors[name] = ConvergenceMonitor(engine, name, peers, slo_seconds=SLO,
                                                 interval=0.5, registry=registry,
                                                 apply_grace_seconds=SLO)
        self.tasks += [asyncio.create_task(self.writers[name].run(self.stop)),
                       asyncio.create_task(self.monitors[name].run(self.stop))]


@pytest.fixture(scope="module")
async def mesh(lab: Lab) -> AsyncIterator[Mesh]:
    """Writers and monitors for the three regions; stopped and disposed at teardown."""
    mesh = Mesh()
    try:
        for name in REGIONS:
            mesh.start(name, lab.servers[name], [p for p in REGIONS if p != name])
        yield mesh
    finally:
        mesh.stop.set()
        await asyncio.gather(*mesh.tasks, return_exceptions=True)
        for engine in mesh.engines.values():
            await engine.dispose()


# --------------------------------------------------------------------------- helpers


async def eventually(check: Callable[[], T | None], within: float, what: str,
                     poll: float = 0.1) -> T:
    """Poll a synchronous `check` (in a thread) until it returns something truthy."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        last = await asyncio.to_thread(check)
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s (last: {last!r})")
        await asyncio.sleep(poll)


async def until(check: Callable[[], Awaitable[bool] | bool], within: float, what: str) -> float:
    """Poll an in-loop `check` every 0.1 s; returns the wall time when it first held."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return time.time()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.1)


def insert_accounts(dsn: str, region: str, n: int, currency: str = "USD") -> list[uuid.UUID]:
    """Open `n` customer accounts homed in `region`, ids made as the node makes them."""
    ids = [CATALOG.stamp(new_id(), region) for _ in range(n)]
    with psycopg.connect(dsn) as conn:
        for account_id in ids:
            conn.execute("insert into accounts (id, currency, kind, home_region) "
                         "values (%s, %s, 'customer', %s)", (account_id, currency, region))
    return ids


def close_oldest_account(dsn: str, region: str) -> None:
    """The owner region updates its oldest account (one every region got long ago)."""
    with psycopg.connect(dsn) as conn:
        cur = conn.execute("update accounts set status = 'closed', updated_at = now() where id = "
                           "(select id from accounts where home_region = %s order by id limit 1)",
                           (region,))
        assert cur.rowcount == 1


def account_ids(dsn: str) -> set[uuid.UUID]:
    """Every account id in one region's copy."""
    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute("select id from accounts")}


def table_rows(dsn: str, table: str) -> list[str]:
    """A table's rows as sorted JSON text (heartbeats keep changing: region and seq>0 only)."""
    query = ("select region from heartbeats order by 1" if table == "heartbeats"
             else f"select to_jsonb(t)::text from {table} t order by 1")
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(query)]


def heartbeat_seqs(dsn: str) -> dict[str, int]:
    """region -> heartbeat seq, as one region's copy has them."""
    with psycopg.connect(dsn) as conn:
        return {r[0]: r[1] for r in conn.execute("select region, seq from heartbeats")}


def conflict_totals(dsns: list[str]) -> dict[str, int]:
    """Sum of every conflict counter over every subscription of these databases."""
    totals = dict.fromkeys(CONFLICT_COLUMNS, 0)
    for dsn in dsns:
        for sub in subscription_status(dsn):
            for key in CONFLICT_COLUMNS:
                totals[key] += sub[key]
    return totals


async def barrier(lab: Lab, mesh: Mesh, names: list[str], within: float = 15.0) -> None:
    """Wait until every region has seen a heartbeat each peer wrote after this call: then it
    has applied every change those peers made (or echoed) before it."""
    marks = {name: await mesh.writers[name].beat() for name in names}

    def seen() -> bool:
        for name in names:
            seqs = heartbeat_seqs(lab.servers[name].dsn("paycluster"))
            if any(seqs.get(peer, 0) < mark for peer, mark in marks.items() if peer != name):
                return False
        return True

    await eventually(seen, within, "heartbeat barrier")


def pair_breach(monitor: ConvergenceMonitor, pair: str) -> dict[str, Any] | None:
    """The breach entry of one pair in a monitor's snapshot."""
    breach: dict[str, Any] | None = monitor.snapshot()["pairs"][pair]["breach"]
    return breach


# --------------------------------------------------------------------------- tests


async def test_rows_replicate_everywhere_once_and_never_loop(lab: Lab, mesh: Mesh) -> None:
    """Accounts opened in each region show up in every region, once; nothing comes back."""
    dsns = [lab.servers[n].dsn("paycluster") for n in REGIONS]
    opened: set[uuid.UUID] = set()
    for name in REGIONS:
        opened |= set(await asyncio.to_thread(insert_accounts, lab.regions[name].dsn, name, 5))

    await eventually(lambda: all(opened <= account_ids(d) for d in dsns), 10,
                     "accounts replicated to every region")
    await barrier(lab, mesh, list(REGIONS))

    for table in ("accounts", "heartbeats"):
        copies = [await asyncio.to_thread(table_rows, d, table) for d in dsns]
        assert copies[0] and all(c == copies[0] for c in copies), table
    assert await asyncio.to_thread(conflict_totals, dsns) == dict.fromkeys(CONFLICT_COLUMNS, 0)
    for name in REGIONS:
        dsn = lab.regions[name].dsn
        for sub in await asyncio.to_thread(subscription_status, dsn):
            assert sub["origin"] == "none" and sub["apply_running"]
            assert sub["apply_error_count"] == 0
        # The only locally written accounts of a region are its own: nothing came back.
        with psycopg.connect(dsn) as conn:
            local = conn.execute(
                "select home_region, count(*) from accounts where "
                "(pg_xact_commit_timestamp_origin(xmin)).roident = 0 group by 1").fetchall()
        assert local == [(name, 5)]


async def test_heartbeat_lag_is_small_when_healthy(lab: Lab, mesh: Mesh) -> None:
    """Every ordered pair's lag is measured, under 2 s, and the SLO holds."""

    def all_measured() -> bool:
        return all(p["lag_seconds"] is not None for m in mesh.monitors.values()
                   for p in m.snapshot()["pairs"].values())

    await until(all_measured, 10, "every pair measured")
    # The replication delay itself, without the heartbeat period: one beat, polled everywhere.
    delays: dict[str, float] = {}
    for name in REGIONS:
        seq = await mesh.writers[name].beat()
        written = time.monotonic()
        for peer in REGIONS:
            if peer != name:
                dsn = lab.regions[peer].dsn
                await eventually(lambda dsn=dsn, name=name, seq=seq:
                                 heartbeat_seqs(dsn).get(name, 0) >= seq, 5, "beat applied",
                                 poll=0.005)
                delays[f"{name}->{peer}"] = round(time.monotonic() - written, 4)
    print("\ncommit-to-visible delay per pair (s, polled every 5 ms):", delays)
    lags: dict[str, list[float]] = {}
    for _ in range(30):  # three seconds of samples: the lag saw-tooths with the heartbeat
        for monitor in mesh.monitors.values():
            for pair, state in monitor.snapshot()["pairs"].items():
                lags.setdefault(pair, []).append(state["lag_seconds"])
        await asyncio.sleep(0.1)
    print("\nhealthy lag per pair, min/max over 3 s (heartbeat every 1 s):",
          {k: (round(min(v), 3), round(max(v), 3)) for k, v in sorted(lags.items())})
    assert len(lags) == 6 and max(max(v) for v in lags.values()) < 2.0
    for name, monitor in mesh.monitors.items():
        snap = monitor.snapshot()
        assert snap["ok"], snap
        assert monitor.stale_pairs() == []
        for peer in REGIONS:
            if peer != name:
                labels = {"from": peer, "to": name}
                lag = mesh.registries[name].get_sample_value(
                    "paycluster_replication_lag_seconds", labels)
                assert lag is not None and 0 <= lag < 2.0
                assert mesh.registries[name].get_sample_value(
                    "paycluster_replication_apply_running", labels) == 1


async def test_cut_link_breaches_slo_then_recovers(lab: Lab, mesh: Mesh) -> None:
    """Cutting eu-west -> us-east: us-east's monitor reports that pair stale within 5 s of
    the lag crossing the SLO, nothing else; after the link heals the breach clears and
    what eu-west wrote meanwhile arrives."""
    monitor = mesh.monitors["us-east"]
    pair = "eu-west->us-east"
    us_east = lab.regions["us-east"].dsn
    assert monitor.stale_pairs() == []

    lab.link.cut()
    try:
        during = await asyncio.to_thread(insert_accounts, lab.regions["eu-west"].dsn, "eu-west", 2)
        detected = await until(lambda: pair_breach(monitor, pair) is not None, SLO + 10,
                               "breach of the cut pair")
        with psycopg.connect(us_east) as conn:
            row = conn.execute("select extract(epoch from sent_at)::float8 from heartbeats "
                               "where region = 'eu-west'").fetchone()
        assert row is not None
        crossed = row[0] + SLO  # the newest heartbeat that got through, plus the SLO
        breach = pair_breach(monitor, pair)
        assert breach is not None
        print(f"\nbreach detected {detected - crossed:.2f}s after the lag crossed {SLO}s: "
              f"{breach['cause']}")
        assert detected - crossed < 5.0
        assert breach["cause"].startswith("lag ")
        assert monitor.stale_pairs() == [pair]
        assert not mesh.monitors["eu-west"].stale_pairs()
        assert not mesh.monitors["ap-southeast"].stale_pairs()
        assert not monitor.snapshot()["ok"]
        assert mesh.registries["us-east"].get_sample_value(
            "paycluster_replication_slo_breach", {"from": "eu-west", "to": "us-east"}) == 1
        assert not set(during) & await asyncio.to_thread(account_ids, us_east)
    finally:
        lab.link.heal()
    await until(lambda: not monitor.stale_pairs(), 10, "breach cleared after heal")
    assert set(during) <= await asyncio.to_thread(account_ids, us_east)
    assert mesh.registries["us-east"].get_sample_value(
        "paycluster_replication_slo_breach", {"from": "eu-west", "to": "us-east"}) == 0


def _insert_duplicate(lab: Lab, account_id: uuid.UUID, loser_first: bool) -> None:
    """us-east and eu-west insert the same account id concurrently: each region's insert is
    in flight when the other's arrives, as in a split brain."""
    with psycopg.connect(lab.regions["us-east"].dsn) as a, \
            psycopg.connect(lab.regions["eu-west"].dsn) as b:
        a.execute("insert into accounts (id, currency, kind, home_region) "
                  "values (%s, 'USD', 'customer', 'us-east')", (account_id,))
        b.execute("insert into accounts (id, currency, kind, home_region) "
                  "values (%s, 'EUR', 'customer', 'us-east')", (account_id,))
        for conn in (b, a) if loser_first else (a, b):
            conn.commit()


@pytest.mark.parametrize("loser_first", [False, True], ids=["winner-commits-first",
                                                            "loser-commits-first"])
async def test_insert_exists_conflict_is_a_breach_until_repaired(lab: Lab, mesh: Mesh,
                                                                 loser_first: bool) -> None:
    """A key inserted in two regions stops the apply workers that meet it; the monitors name
    the conflict and the stopped worker; `resolve_duplicate_key` makes us-east's row the
    only one everywhere, the workers resume and the breaches clear."""
    account_id = CATALOG.stamp(new_id(), "us-east")
    await asyncio.to_thread(_insert_duplicate, lab, account_id, loser_first)

    east, west = mesh.monitors["us-east"], mesh.monitors["eu-west"]
    pair = "eu-west->us-east"

    def conflict_named(monitor: ConvergenceMonitor, pair: str) -> bool:
        breach = pair_breach(monitor, pair)
        return breach is not None and "confl_insert_exists=" in breach["cause"]

    await until(lambda: conflict_named(east, "eu-west->us-east")
                and conflict_named(west, "us-east->eu-west"), 10, "insert_exists breach")
    await until(lambda: "apply worker for sub_eu_west" in str(pair_breach(east, pair)),
                SLO + 6, "stopped apply worker named as the cause")
    print("\nconflict breach:", pair_breach(east, "eu-west->us-east"))
    assert "eu-west->us-east" in east.stale_pairs()
    assert mesh.registries["us-east"].get_sample_value(
        "paycluster_replication_conflicts",
        {"from": "eu-west", "to": "us-east", "kind": "insert_exists"}) >= 1

    actions = await asyncio.to_thread(resolve_duplicate_key, lab.regions, table="accounts",
                                      key={"id": account_id}, winner="us-east")
    print("repair:", actions)
    assert any("skip eu-west's transaction" in a for a in actions)

    await until(lambda: all(not m.stale_pairs() for m in mesh.monitors.values()), 15,
                "every breach cleared after the repair")
    dsns = [lab.regions[n].dsn for n in REGIONS]
    for dsn in dsns:
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select currency from accounts where id = %s",
                                (account_id,)).fetchone() == ("USD",)
    await barrier(lab, mesh, list(REGIONS))
    copies = [await asyncio.to_thread(table_rows, d, "accounts") for d in dsns]
    assert all(c == copies[0] for c in copies)
    assert await asyncio.to_thread(conflict_totals, dsns) == dict.fromkeys(CONFLICT_COLUMNS, 0)


async def test_add_region_joins_with_every_row_once(lab: Lab, mesh: Mesh) -> None:
    """us-west joins a cluster that has rows and keeps writing while it joins: it ends with
    exactly the rows every region has, then converges both ways like the others."""
    server = await asyncio.to_thread(lab.start_server, NEW_REGION)
    new = RegionDb(NEW_REGION, server.dsn("paycluster"))
    writing = asyncio.Event()
    written: list[uuid.UUID] = []

    async def keep_writing() -> None:
        # Writes in all three regions all along the join: none may be lost or doubled.
        while not writing.is_set():
            for name in REGIONS:
                written.extend(await asyncio.to_thread(insert_accounts, lab.regions[name].dsn,
                                                       name, 1))
            await asyncio.sleep(0.02)

    writer = asyncio.create_task(keep_writing())
    try:
        report = await asyncio.to_thread(add_region, lab.regions, new, donor="us-east")
    finally:
        writing.set()
        await writer
    print(f"\nadd_region: {report}; {len(written)} accounts written during the join")
    assert report.donor == "us-east" and set(report.start_lsns) == {"eu-west", "ap-southeast"}
    assert report.rows_copied["accounts"] > 0

    lab.regions[NEW_REGION] = new
    everyone = [*REGIONS, NEW_REGION]
    mesh.start(NEW_REGION, server, [p for p in everyone if p != NEW_REGION])
    for name in REGIONS:
        mesh.monitors[name].set_peers([p for p in everyone if p != name])
    after = await asyncio.to_thread(insert_accounts, new.dsn, NEW_REGION, 3)
    # Owners keep updating rows the new region only has from the copy: no conflict may count.
    for name in REGIONS:
        await asyncio.to_thread(close_oldest_account, lab.regions[name].dsn, name)
    for name in REGIONS:
        after += await asyncio.to_thread(insert_accounts, lab.regions[name].dsn, name, 1)

    dsns = [lab.regions[n].dsn for n in everyone]
    await eventually(lambda: all(set(written + after) <= account_ids(d) for d in dsns), 20,
                     "every account in all four regions")
    await barrier(lab, mesh, everyone)
    for table in REPLICATED_TABLES:
        copies = [await asyncio.to_thread(table_rows, d, table) for d in dsns]
        assert all(c == copies[0] for c in copies), f"{table} differs between regions"
    assert await asyncio.to_thread(conflict_totals, dsns) == dict.fromkeys(CONFLICT_COLUMNS, 0)
    # Heartbeats are updates of rows the new region got from the copy: none went missing.
    seqs = await asyncio.to_thread(heartbeat_seqs, new.dsn)
    assert set(seqs) == set(everyone)
    await until(lambda: all(m.snapshot()["ok"] and len(m.snapshot()["pairs"]) == 3
                            for m in mesh.monitors.values()), 15, "all 12 pairs within the SLO")
