"""Wire the regions' PostgreSQL databases into an active-active mesh (logical replication).

Topology
--------
Every region publishes its replicated tables (`region_node.schema.REPLICATED_TABLES`) in a
publication named ``paycluster`` and subscribes to every other region's publication with
``origin = none``: the publisher then sends only the changes that were *originated* in its
own database, never the ones it applied from a third region, so a change travels exactly
one hop and never loops. Names:

- the subscription on region R for publisher P is ``sub_<P>`` (region names sanitized:
  ``eu-west`` -> ``eu_west``); its comment records ``{"publisher": P, "subscriber": R}``;
- its replication slot on P is ``pc_<P>_to_<R>``, and the walsender on P carries the same
  name as ``application_name`` (the default would be the subscription name, which is the
  same for every subscriber of P, so ``synchronous_standby_names`` on P could not single
  out a failover buddy; use ``pc_<P>_to_<buddy>`` there).

Subscriptions use ``streaming = on`` (not PostgreSQL 18's default ``parallel``): payment
transactions are small, so streaming rarely happens, and serial apply keeps commit order
and needs no extra worker slots (``max_logical_replication_workers`` is shared by every
subscription of the server). ``disable_on_error = false``: a failing apply worker is
restarted every ``wal_retrieve_retry_interval``, and the convergence monitor
(`region_node.replication_monitor`) turns a worker that keeps failing into an SLO breach.

Every function here is synchronous (psycopg 3, autocommit, since CREATE/DROP SUBSCRIPTION
cannot run in a transaction block) and idempotent where that makes sense: the cluster
calls them again on every ``paycluster up``; a subscription whose publisher moved (a new
WAN-link port) gets its connection updated in place.

Adding a region to a running cluster is `replication.join.add_region`; repairing an
``insert_exists`` conflict is `replication.repair.resolve_duplicate_key`. The subscription
names and the status query are the node's (`region_node.replication_status`, re-exported
here), since its convergence monitor reads them too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from region_node.replication_status import CONFLICT_COLUMNS as CONFLICT_COLUMNS
from region_node.replication_status import STATUS_SQL as STATUS_SQL
from region_node.replication_status import ident as ident
from region_node.replication_status import status_row as status_row
from region_node.replication_status import subscription_name as subscription_name
from region_node.schema import REPLICATED_TABLES
from replication.errors import ReplicationError
from replication.libpq import libpq_url
from replication.tls import ensure_replication_role

log = logging.getLogger("replication.wiring")

PUBLICATION = "paycluster"
"""Name of the publication every region creates for its own replicated tables."""

Endpoint = tuple[str, int]


class WiringError(ReplicationError):
    """The cluster is not in a state the requested wiring step can start from."""


# --------------------------------------------------------------------------- names


def slot_name(publisher_region: str, subscriber_region: str) -> str:
    """Name of the subscriber's replication slot on the publisher (also its application_name)."""
    name = f"pc_{ident(publisher_region)}_to_{ident(subscriber_region)}"
    if len(name) > 63:
        raise ValueError(f"slot name {name!r} is longer than PostgreSQL's 63 bytes")
    return name


# --------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class RegionDb:
    """One region's database as the wiring sees it.

    `dsn` is how this process (the operator) reaches the database. `reach` maps another
    region's name to the (host, port) at which *that* region reaches this region's
    PostgreSQL, e.g. the local port of the WAN link from that region to this one; a
    region not in `reach` uses the host and port of `dsn`. `replication_user` is the role
    other regions' subscriptions log in as here (the lab: replication.tls.REPLICATION_ROLE,
    through its TLS gateways; bare test servers: postgres).
    """

    name: str
    dsn: str
    reach: Mapping[str, Endpoint] = field(default_factory=dict)
    replication_user: str = "postgres"
    # Only where subscriptions log in with a password (a managed PostgreSQL without the
    # lab's TLS gateways); it is then part of the subscriptions' connection strings.
    replication_password: str | None = field(default=None, repr=False)

    @property
    def dbname(self) -> str:
        """Database name in `dsn`."""
        return str(conninfo_to_dict(libpq_url(self.dsn)).get("dbname") or "postgres")

    def endpoint_for(self, subscriber_region: str) -> Endpoint:
        """(host, port) at which `subscriber_region` reaches this region's PostgreSQL."""
        if subscriber_region in self.reach:
            host, port = self.reach[subscriber_region]
            return host, int(port)
        info = conninfo_to_dict(libpq_url(self.dsn))
        return str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)


def region_map(regions: Mapping[str, RegionDb] | Iterable[RegionDb]) -> dict[str, RegionDb]:
    """`regions` by name; ValueError if a name is given twice or two names collide once
    sanitized (`ident`), since their subscriptions and slots would share a name."""
    items = list(regions.values()) if isinstance(regions, Mapping) else list(regions)
    out: dict[str, RegionDb] = {}
    for region in items:
        if region.name in out:
            raise ValueError(f"region {region.name!r} given twice")
        out[region.name] = region
    idents = [ident(name) for name in out]
    if len(set(idents)) != len(idents):
        raise ValueError(f"region names collide once sanitized: {sorted(out)}")
    return out


# --------------------------------------------------------------------------- connections


@contextmanager
def connect(dsn: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """An autocommit connection with dict rows (CREATE/DROP SUBSCRIPTION cannot run in a
    transaction block), closed when the block ends."""
    with psycopg.connect(libpq_url(dsn), autocommit=True, row_factory=dict_row,
                         connect_timeout=10) as conn:
        yield conn


def subscription_row(conn: psycopg.Connection[dict[str, Any]],
                     name: str) -> dict[str, Any] | None:
    """The current database's subscription `name` (oid, subname, subenabled, subconninfo,
    subslotname), or None."""
    return conn.execute(
        """select s.oid, s.subname, s.subenabled, s.subconninfo, s.subslotname
             from pg_subscription s
            where s.subname = %s
              and s.subdbid = (select oid from pg_database where datname = current_database())""",
        (name,)).fetchone()


def origin_lsn(conn: psycopg.Connection[dict[str, Any]], subid: int) -> str | None:
    """Origin progress of a subscription: end LSN of the last remote commit it applied."""
    row = conn.execute(
        "select remote_lsn::text as lsn from pg_replication_origin_status where external_id = %s",
        (f"pg_{subid}",)).fetchone()
    lsn = row["lsn"] if row else None
    return None if lsn in (None, "0/0", "0/00000000") else str(lsn)


# --------------------------------------------------------------------------- publish / subscribe


def create_publication(dsn: str, tables: Sequence[str] = REPLICATED_TABLES,
                       replication_password: str | None = None) -> bool:
    """Create the region's publication of `tables`; if it exists, make its table set match.

    Also makes sure the replication role subscribers log in as exists and may read them
    (with `replication_password` where they log in over TCP, e.g. a managed PostgreSQL).
    Returns True when something was created or changed.
    """
    wanted = sorted(tables)
    with connect(dsn) as conn:
        ensure_replication_role(conn, wanted, replication_password)
        exists = conn.execute("select 1 from pg_publication where pubname = %s",
                              (PUBLICATION,)).fetchone()
        table_list = sql.SQL(", ").join(sql.Identifier(t) for t in wanted)
        if not exists:
            conn.execute(sql.SQL("create publication {} for table {}").format(
                sql.Identifier(PUBLICATION), table_list))
            return True
        have = sorted(r["tablename"] for r in conn.execute(
            "select tablename from pg_publication_tables where pubname = %s", (PUBLICATION,)))
        if have == wanted:
            return False
        conn.execute(sql.SQL("alter publication {} set table {}").format(
            sql.Identifier(PUBLICATION), table_list))
        return True


def subscribe(subscriber_dsn: str, subscriber_region: str, publisher_region: str,
              publisher_host: str, publisher_port: int, dbname: str = "paycluster",
              copy_data: bool = False, *, user: str = "postgres", password: str | None = None,
              enabled: bool = True, create_slot: bool = True, streaming: str = "on",
              connect_timeout: int = 10) -> bool:
    """Subscribe `subscriber_region` to `publisher_region`'s publication (origin = none).

    The subscription is `sub_<publisher>`, its slot `pc_<publisher>_to_<subscriber>`.
    Idempotent: returns False if the subscription already exists (its connection is
    updated if the publisher's host/port or the user changed), True when it was created.
    """
    name = subscription_name(publisher_region)
    slot = slot_name(publisher_region, subscriber_region)
    conninfo = make_conninfo(host=publisher_host, port=str(publisher_port), dbname=dbname,
                             user=user, password=password, application_name=slot,
                             connect_timeout=str(connect_timeout))
    with connect(subscriber_dsn) as conn:
        existing = subscription_row(conn, name)
        if existing is not None:
            have = conninfo_to_dict(existing["subconninfo"])
            want = conninfo_to_dict(conninfo)
            if any(have.get(k) != want.get(k) for k in ("host", "port", "dbname", "user")):
                conn.execute(sql.SQL("alter subscription {} connection {}").format(
                    sql.Identifier(name), sql.Literal(conninfo)))
                log.info("subscription %s on %s now connects to %s:%s", name, subscriber_region,
                         publisher_host, publisher_port)
            return False
        conn.execute(sql.SQL(
            "create subscription {name} connection {conninfo} publication {pub} with ("
            "origin = none, copy_data = {copy}, create_slot = {create}, enabled = {enabled},"
            " slot_name = {slot}, streaming = {streaming}, disable_on_error = false)").format(
            name=sql.Identifier(name), conninfo=sql.Literal(conninfo),
            pub=sql.Identifier(PUBLICATION), copy=sql.Literal(copy_data),
            create=sql.Literal(create_slot), enabled=sql.Literal(enabled),
            slot=sql.Literal(slot), streaming=sql.Literal(streaming)))
        conn.execute(sql.SQL("comment on subscription {} is {}").format(
            sql.Identifier(name), sql.Literal(json.dumps(
                {"publisher": publisher_region, "subscriber": subscriber_region}))))
    log.info("%s subscribed to %s via %s:%s (copy_data=%s)", subscriber_region,
             publisher_region, publisher_host, publisher_port, copy_data)
    return True


def unsubscribe(subscriber_dsn: str, publisher_region: str, *, drop_slot: bool = True) -> bool:
    """Drop the subscription to `publisher_region`; False if there was none.

    With `drop_slot` (the default) PostgreSQL connects to the publisher and drops the slot
    there too, which fails while the publisher is unreachable; with `drop_slot=False` the
    slot is left on the publisher (drop it there, or it keeps WAL forever).
    """
    name = subscription_name(publisher_region)
    with connect(subscriber_dsn) as conn:
        if subscription_row(conn, name) is None:
            return False
        ident_ = sql.Identifier(name)
        if not drop_slot:
            conn.execute(sql.SQL("alter subscription {} disable").format(ident_))
            conn.execute(sql.SQL("alter subscription {} set (slot_name = none)").format(ident_))
        conn.execute(sql.SQL("drop subscription {}").format(ident_))
    return True


def set_enabled(subscriber_dsn: str, publisher_region: str, enabled: bool) -> None:
    """Enable or disable (pause) the subscription to `publisher_region`."""
    with connect(subscriber_dsn) as conn:
        conn.execute(sql.SQL("alter subscription {} {}").format(
            sql.Identifier(subscription_name(publisher_region)),
            sql.SQL("enable" if enabled else "disable")))


def reset_conflict_counters(dsn: str, publisher_region: str | None = None) -> None:
    """Reset `pg_stat_subscription_stats` (conflict and error counters) of one subscription,
    or of every subscription of the database: how an operator acknowledges a repaired
    conflict (the monitor keeps a conflict breach open until then)."""
    with connect(dsn) as conn:
        if publisher_region is None:
            conn.execute(
                """select pg_stat_reset_subscription_stats(oid) from pg_subscription
                    where subdbid =
                          (select oid from pg_database where datname = current_database())""")
            return
        sub = subscription_row(conn, subscription_name(publisher_region))
        if sub is not None:
            conn.execute("select pg_stat_reset_subscription_stats(%s)", (sub["oid"],))


# --------------------------------------------------------------------------- status

def subscription_status(dsn: str) -> list[dict[str, Any]]:
    """Every subscription of the database with its apply worker and PostgreSQL 18 counters.

    Keys: subid, name, publisher, subscriber, enabled, slot_name, origin, streaming,
    skip_lsn, apply_pid, apply_running, received_lsn, latest_end_lsn,
    last_msg_receipt_time, latest_end_time, remote_lsn (origin progress),
    tables_not_ready, apply_error_count, sync_error_count, the `confl_*` counters and
    `conflicts` (the same counters as a dict), stats_reset.
    """
    with connect(dsn) as conn:
        return [status_row(r) for r in conn.execute(STATUS_SQL)]


def wait_until_replicating(dsn: str, timeout_seconds: float = 60.0,
                           publishers: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Wait until every (or each named publisher's) subscription is enabled, has a running
    apply worker and all its tables synchronized; returns the status. TimeoutError else."""
    names = None if publishers is None else {subscription_name(p) for p in publishers}
    deadline = time.monotonic() + timeout_seconds
    while True:
        status = [s for s in subscription_status(dsn) if names is None or s["name"] in names]
        missing = set() if names is None else names - {s["name"] for s in status}
        waiting = [s["name"] for s in status
                   if not (s["enabled"] and s["apply_running"] and s["tables_not_ready"] == 0)]
        if not missing and not waiting:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"subscriptions not replicating after {timeout_seconds}s: "
                               f"{sorted(missing) + waiting}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- whole cluster


def has_replicated_rows(conn: psycopg.Connection[dict[str, Any]]) -> int:
    """How many replicated tables hold at least one row (0: none does)."""
    parts = sql.SQL(" union all ").join(
        sql.SQL("(select 1 from {} limit 1)").format(sql.Identifier(t)) for t in REPLICATED_TABLES)
    row = conn.execute(sql.SQL("select count(*) as n from ({}) t").format(parts)).fetchone()
    return int(row["n"]) if row else 0


def wire_cluster(regions: Mapping[str, RegionDb] | Iterable[RegionDb], *,
                 streaming: str = "on") -> list[tuple[str, str]]:
    """Publish in every region and subscribe every region to every other (full mesh).

    For a cluster that is being created: a pair that is not wired yet is only wired if its
    publisher holds no replicated rows (they would never reach the subscriber; use
    `add_region` to bring a region into a cluster that already has data). Pairs already
    wired are left alone (connections updated if an endpoint moved), so this is safe to
    run on every start. Returns the (subscriber, publisher) pairs it created.
    """
    by_name = region_map(regions)
    for region in by_name.values():
        create_publication(region.dsn, replication_password=region.replication_password)
    created: list[tuple[str, str]] = []
    for sub in by_name.values():
        with connect(sub.dsn) as conn:
            existing = {r["subname"] for r in conn.execute(
                """select subname from pg_subscription where subdbid =
                   (select oid from pg_database where datname = current_database())""")}
        for pub in by_name.values():
            if pub.name == sub.name:
                continue
            if subscription_name(pub.name) not in existing:
                with connect(pub.dsn) as conn:
                    if has_replicated_rows(conn):
                        raise WiringError(
                            f"{pub.name} already holds replicated rows; wiring {sub.name} to it "
                            "with copy_data=false would lose them (use add_region)")
            host, port = pub.endpoint_for(sub.name)
            if subscribe(sub.dsn, sub.name, pub.name, host, port, dbname=pub.dbname,
                         streaming=streaming, user=pub.replication_user,
                         password=pub.replication_password):
                created.append((sub.name, pub.name))
    return created
