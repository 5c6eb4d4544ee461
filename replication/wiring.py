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
(`replication.monitor`) turns a worker that keeps failing into an SLO breach.

Every function here is synchronous (psycopg 3, autocommit, since CREATE/DROP SUBSCRIPTION
cannot run in a transaction block) and idempotent where that makes sense: the cluster
calls them again on every ``paycluster up``; a subscription whose publisher moved (a new
WAN-link port) gets its connection updated in place.

Adding a region to a running cluster (`add_region`)
---------------------------------------------------
The new region N must receive every existing row exactly once, then every later change
exactly once, and its copies must not trip PostgreSQL's conflict detection later.
``copy_data = true`` does not fit: the table copy cannot filter by origin (PostgreSQL 18
only warns that it "might copy data that had a different origin"), so copying from every
region would import each row once per region; and rows copied by table sync carry a
throw-away table-sync replication origin, so the first update of each copied row by its
owner is counted as ``update_origin_differs`` on N (verified on 18.6), which would be a
standing conflict alarm. Instead, everything is copied once from ONE donor region D, in
one consistent snapshot, and N's stream from every other region E starts exactly where
D's copy of E's data ends:

1. N is migrated and publishes (nothing yet); it must not serve traffic until done. N's
   subscriptions to every existing region are created disabled, without slots.
2. D's subscriptions to every other region E are paused (``DISABLE``) and we wait until
   their apply workers have exited. D's content from E is now frozen at the origin
   progress ``R_E`` (``pg_replication_origin_status.remote_lsn`` of ``pg_<subid>``: the
   end of the last E transaction D applied). D keeps serving its own writes.
3. On every E, D's slot ``pc_E_to_D`` is copied to ``pc_E_to_N``
   (``pg_copy_logical_replication_slot``): the copy keeps the WAL and the decoding
   position from which D would resume.
4. On D, the slot ``pc_D_to_N`` is created over the replication protocol with
   ``SNAPSHOT 'export'``; a read-only REPEATABLE READ transaction imports that snapshot,
   which holds exactly D's own commits before the slot's consistent point and E's rows up
   to ``R_E``. D's subscriptions are resumed right away (the pause lasts only steps 2-4).
5. Every replicated table is copied from that snapshot into N, grouped by each row's
   origin on D (``pg_xact_commit_timestamp_origin(xmin)``): D's own rows are written in a
   session bound to the replication origin of N's subscription to D, E's rows to that of
   N's subscription to E. A copied row thus looks as if its owner's stream had applied it,
   and its owner's later updates are not conflicts. (Rows whose origin D no longer knows,
   e.g. commit timestamps truncated long ago, are attributed to D.)
6. The origins of N's subscriptions to every E are advanced to ``R_E``
   (``pg_replication_origin_advance``, as ``pg_createsubscriber`` does) and all of N's
   subscriptions are enabled: the walsender skips exactly the transactions whose commit
   lies before the start point (they are in the snapshot) and sends every later one; D's
   stream starts at the slot's consistent point, which is the snapshot's.
7. Every existing region subscribes to N with ``copy_data = false``; N's copied rows are
   not sent back (they carry replication origins, and predate the new slots anyway).

Guarantee: with D's subscriptions to every other region healthy at the start (checked:
enabled, no conflicts), N ends with exactly the rows of the cluster, each once, with zero
conflicts, and then converges like every other region. The price is a short pause of
D's inbound replication (slot creation waits for D's running transactions to finish).
On failure, N's subscriptions and slots are dropped, its tables emptied, D resumed.

Repairing an ``insert_exists`` conflict (`resolve_duplicate_key`)
-----------------------------------------------------------------
Unique keys are designed so that only one region can insert them. If two regions insert
the same key anyway, the full mesh spreads the damage: each of them is stuck applying the
other's insert, and a third region applied whichever came first and is stuck on the
other. The apply workers retry forever (``disable_on_error = false``) and the monitor
reports the breach with ``confl_insert_exists``. The repair, given the key and the
region whose row wins:

1. For every losing region L (a region whose copy of the row was written locally, found
   with ``pg_xact_commit_timestamp_origin(xmin)``; needs ``track_commit_timestamp``), the
   commit LSN of its insert is read on L by peeking, with pgoutput, a temporary copy of
   the winner's slot on L (the winner is stuck on exactly that transaction).
2. Every region that has not applied L's transaction yet gets
   ``ALTER SUBSCRIPTION sub_<L> SKIP (lsn = ...)`` for it.
3. Every region that holds a loser's row (the losers themselves, and a third region that
   applied a loser's insert first) deletes it *unpublished*: in a session bound to the
   replication origin ``paycluster_repair``, so ``origin = none`` subscriptions never
   send the delete on. The winner's insert, waiting behind it, then applies there.
4. Once every region has the winner's row and its apply workers run, the conflict
   counters of the affected subscriptions are reset: the monitor keeps a conflict breach
   until they are, so a conflict is never forgotten by a restart, only acknowledged.

Skipping discards the loser's whole transaction on the regions that had not applied it;
the repair is exact when that transaction inserted only the conflicting row (for more,
re-create the rest at its owner). The deleted row must not be referenced yet (foreign
keys are enforced for the repair session).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from region_node.schema import REPLICATED_TABLES
from replication.tls import ensure_replication_role

log = logging.getLogger("replication.wiring")

PUBLICATION = "paycluster"
"""Name of the publication every region creates for its own replicated tables."""

REPAIR_ORIGIN = "paycluster_repair"
"""Replication origin that marks repair writes, so `origin = none` never forwards them."""

CONFLICT_COLUMNS: tuple[str, ...] = (
    "confl_insert_exists", "confl_update_origin_differs", "confl_update_exists",
    "confl_update_missing", "confl_delete_origin_differs", "confl_delete_missing",
    "confl_multiple_unique_conflicts",
)
"""PostgreSQL 18's conflict counters in `pg_stat_subscription_stats` (verified on 18.6)."""

Endpoint = tuple[str, int]


class WiringError(RuntimeError):
    """The cluster is not in a state the requested wiring step can start from."""


# --------------------------------------------------------------------------- names


def ident(region: str) -> str:
    """A region name as a lower-case SQL identifier fragment (`eu-west` -> `eu_west`)."""
    out = re.sub(r"[^a-z0-9_]", "_", region.strip().lower())
    if not out or not re.search(r"[a-z0-9]", out):
        raise ValueError(f"region name {region!r} has no usable characters")
    return out


def subscription_name(publisher_region: str) -> str:
    """Name of the subscription (on any subscriber) to `publisher_region`."""
    return f"sub_{ident(publisher_region)}"


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
        return str(conninfo_to_dict(_libpq(self.dsn)).get("dbname") or "postgres")

    def endpoint_for(self, subscriber_region: str) -> Endpoint:
        """(host, port) at which `subscriber_region` reaches this region's PostgreSQL."""
        if subscriber_region in self.reach:
            host, port = self.reach[subscriber_region]
            return host, int(port)
        info = conninfo_to_dict(_libpq(self.dsn))
        return str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)


def _as_map(regions: Mapping[str, RegionDb] | Iterable[RegionDb]) -> dict[str, RegionDb]:
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


def _libpq(dsn: str) -> str:
    return dsn.replace("postgresql+psycopg://", "postgresql://", 1)


@contextmanager
def _connect(dsn: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with psycopg.connect(_libpq(dsn), autocommit=True, row_factory=dict_row,
                         connect_timeout=10) as conn:
        yield conn


def _subscription(conn: psycopg.Connection[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return conn.execute(
        """select s.oid, s.subname, s.subenabled, s.subconninfo, s.subslotname
             from pg_subscription s
            where s.subname = %s
              and s.subdbid = (select oid from pg_database where datname = current_database())""",
        (name,)).fetchone()


def _origin_lsn(conn: psycopg.Connection[dict[str, Any]], subid: int) -> str | None:
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
    with _connect(dsn) as conn:
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
    with _connect(subscriber_dsn) as conn:
        existing = _subscription(conn, name)
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
    with _connect(subscriber_dsn) as conn:
        if _subscription(conn, name) is None:
            return False
        ident_ = sql.Identifier(name)
        if not drop_slot:
            conn.execute(sql.SQL("alter subscription {} disable").format(ident_))
            conn.execute(sql.SQL("alter subscription {} set (slot_name = none)").format(ident_))
        conn.execute(sql.SQL("drop subscription {}").format(ident_))
    return True


def set_enabled(subscriber_dsn: str, publisher_region: str, enabled: bool) -> None:
    """Enable or disable (pause) the subscription to `publisher_region`."""
    with _connect(subscriber_dsn) as conn:
        conn.execute(sql.SQL("alter subscription {} {}").format(
            sql.Identifier(subscription_name(publisher_region)),
            sql.SQL("enable" if enabled else "disable")))


def reset_conflict_counters(dsn: str, publisher_region: str | None = None) -> None:
    """Reset `pg_stat_subscription_stats` (conflict and error counters) of one subscription,
    or of every subscription of the database: how an operator acknowledges a repaired
    conflict (the monitor keeps a conflict breach open until then)."""
    with _connect(dsn) as conn:
        if publisher_region is None:
            conn.execute(
                """select pg_stat_reset_subscription_stats(oid) from pg_subscription
                    where subdbid =
                          (select oid from pg_database where datname = current_database())""")
            return
        sub = _subscription(conn, subscription_name(publisher_region))
        if sub is not None:
            conn.execute("select pg_stat_reset_subscription_stats(%s)", (sub["oid"],))


# --------------------------------------------------------------------------- status

STATUS_SQL = """
select s.oid::bigint as subid, s.subname as name, s.subenabled as enabled,
       s.subslotname::text as slot_name, s.suborigin as origin, s.substream::text as streaming,
       s.subskiplsn::text as skip_lsn, obj_description(s.oid, 'pg_subscription') as comment,
       w.pid as apply_pid, w.received_lsn::text as received_lsn,
       w.latest_end_lsn::text as latest_end_lsn, w.last_msg_receipt_time, w.latest_end_time,
       o.remote_lsn::text as remote_lsn,
       (select count(*) from pg_subscription_rel r
         where r.srsubid = s.oid and r.srsubstate <> 'r') as tables_not_ready,
       st.apply_error_count, st.sync_error_count,
       st.confl_insert_exists, st.confl_update_origin_differs, st.confl_update_exists,
       st.confl_update_missing, st.confl_delete_origin_differs, st.confl_delete_missing,
       st.confl_multiple_unique_conflicts, st.stats_reset
  from pg_subscription s
  left join pg_stat_subscription w on w.subid = s.oid and w.worker_type = 'apply'
  left join pg_stat_subscription_stats st on st.subid = s.oid
  left join pg_replication_origin_status o on o.external_id = 'pg_' || s.oid::text
 where s.subdbid = (select oid from pg_database where datname = current_database())
 order by s.subname
"""
"""One row per subscription of the current database: state, apply worker, counters.
Shared with the monitor (which runs it through SQLAlchemy)."""


def status_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Normalize a `STATUS_SQL` row: publisher/subscriber from the comment, counters as ints,
    `apply_running` (False when `pg_stat_subscription.pid` is null) and a `conflicts` dict."""
    out = dict(row)
    meta: dict[str, Any] = {}
    with suppress(TypeError, ValueError):
        meta = json.loads(row.get("comment") or "{}")
    out["publisher"] = meta.get("publisher")
    out["subscriber"] = meta.get("subscriber")
    out["apply_running"] = row.get("apply_pid") is not None
    for key in ("apply_error_count", "sync_error_count", "tables_not_ready", *CONFLICT_COLUMNS):
        out[key] = int(row.get(key) or 0)
    out["conflicts"] = {key: out[key] for key in CONFLICT_COLUMNS}
    return out


def subscription_status(dsn: str) -> list[dict[str, Any]]:
    """Every subscription of the database with its apply worker and PostgreSQL 18 counters.

    Keys: subid, name, publisher, subscriber, enabled, slot_name, origin, streaming,
    skip_lsn, apply_pid, apply_running, received_lsn, latest_end_lsn,
    last_msg_receipt_time, latest_end_time, remote_lsn (origin progress),
    tables_not_ready, apply_error_count, sync_error_count, the `confl_*` counters and
    `conflicts` (the same counters as a dict), stats_reset.
    """
    with _connect(dsn) as conn:
        return [status_row(r) for r in conn.execute(STATUS_SQL)]


def wait_until_replicating(dsn: str, timeout: float = 60.0,
                           publishers: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Wait until every (or each named publisher's) subscription is enabled, has a running
    apply worker and all its tables synchronized; returns the status. TimeoutError else."""
    names = None if publishers is None else {subscription_name(p) for p in publishers}
    deadline = time.monotonic() + timeout
    while True:
        status = [s for s in subscription_status(dsn) if names is None or s["name"] in names]
        missing = set() if names is None else names - {s["name"] for s in status}
        waiting = [s["name"] for s in status
                   if not (s["enabled"] and s["apply_running"] and s["tables_not_ready"] == 0)]
        if not missing and not waiting:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"subscriptions not replicating after {timeout}s: "
                               f"{sorted(missing) + waiting}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- whole cluster


def _replicated_rows(conn: psycopg.Connection[dict[str, Any]]) -> int:
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
    by_name = _as_map(regions)
    for region in by_name.values():
        create_publication(region.dsn, replication_password=region.replication_password)
    created: list[tuple[str, str]] = []
    for sub in by_name.values():
        with _connect(sub.dsn) as conn:
            existing = {r["subname"] for r in conn.execute(
                """select subname from pg_subscription where subdbid =
                   (select oid from pg_database where datname = current_database())""")}
        for pub in by_name.values():
            if pub.name == sub.name:
                continue
            if subscription_name(pub.name) not in existing:
                with _connect(pub.dsn) as conn:
                    if _replicated_rows(conn):
                        raise WiringError(
                            f"{pub.name} already holds replicated rows; wiring {sub.name} to it "
                            "with copy_data=false would lose them (use add_region)")
            host, port = pub.endpoint_for(sub.name)
            if subscribe(sub.dsn, sub.name, pub.name, host, port, dbname=pub.dbname,
                         streaming=streaming, user=pub.replication_user,
                         password=pub.replication_password):
                created.append((sub.name, pub.name))
    return created


@dataclass
class AddRegionReport:
    """What `add_region` did: the donor, the donor's snapshot point, where each other
    region's stream to the new region starts, rows copied per table, and how long the
    donor's inbound replication was paused."""

    region: str
    donor: str
    snapshot_lsn: str
    start_lsns: dict[str, str | None]
    rows_copied: dict[str, int]
    donor_paused_seconds: float
    seconds: float


def _wait_workers_gone(conn: psycopg.Connection[dict[str, Any]], subids: list[int],
                       timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            "select count(*) as n from pg_stat_subscription"
            " where subid = any(%s) and pid is not null",
            (subids,)).fetchone()
        if not row or not row["n"]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"apply workers of {subids} still running after {timeout}s")
        time.sleep(0.05)


def _drop_slot_if_idle(dsn: str, slot: str) -> None:
    with _connect(dsn) as conn:
        row = conn.execute("select active from pg_replication_slots where slot_name = %s",
                           (slot,)).fetchone()
        if row is not None and not row["active"]:
            conn.execute("select pg_drop_replication_slot(%s)", (slot,))


def _slot_with_snapshot(dsn: str, slot: str) -> tuple[psycopg.Connection[Any], str, str]:
    """Create a pgoutput slot over the replication protocol, exporting its snapshot.

    Returns the replication connection (the snapshot lives until it runs another command
    or closes), the snapshot name and the slot's consistent point. Replication commands
    need the simple query protocol, hence libpq's PQexec through `pgconn.exec_`.
    """
    conn = psycopg.connect(_libpq(dsn), autocommit=True, replication="database",
                           connect_timeout=10)
    try:
        res = conn.pgconn.exec_(
            f"CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput (SNAPSHOT 'export')".encode())
        if res.status != pq.ExecStatus.TUPLES_OK:
            raise WiringError(f"cannot create slot {slot}: "
                              f"{res.error_message.decode(errors='replace').strip()}")
        consistent_point = (res.get_value(0, 1) or b"").decode()
        snapshot = (res.get_value(0, 2) or b"").decode()
    except BaseException:
        conn.close()
        raise
    return conn, snapshot, consistent_point


def _copy_tables(src: psycopg.Connection[Any], dst_dsn: str,
                 groups: list[tuple[sql.Composable, str]]) -> dict[str, int]:
    """Copy every replicated table from `src` (inside its snapshot) to `dst_dsn`.

    Each (predicate on the donor's row origin, destination origin name) group is copied
    in its own transaction of a session bound to that replication origin, so each row
    carries the origin its later updates will arrive with and PostgreSQL does not count
    them as `update_origin_differs`. `session_replication_role = replica` turns foreign
    key and user triggers off, as for the apply workers.
    """
    copied: dict[str, int] = {}
    with psycopg.connect(_libpq(dst_dsn), autocommit=True) as dst:
        dst.execute("set session_replication_role = replica")
        for table in REPLICATED_TABLES:
            cols = [r[0] for r in dst.execute(
                """select attname from pg_attribute where attrelid = %s::regclass
                   and attnum > 0 and not attisdropped and attgenerated = '' order by attnum""",
                (table,))]
            col_list = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
            copied[table] = 0
            for predicate, origin in groups:
                dst.execute("select pg_replication_origin_session_setup(%s)", (origin,))
                try:
                    out_sql = sql.SQL(
                        "copy (select {cols} from {table} t where {pred}) to stdout"
                        " (format binary)").format(cols=col_list, table=sql.Identifier(table),
                                                   pred=predicate)
                    in_sql = sql.SQL("copy {table} ({cols}) from stdin (format binary)").format(
                        table=sql.Identifier(table), cols=col_list)
                    with src.cursor().copy(out_sql) as out, dst.cursor().copy(in_sql) as inp:
                        for block in out:
                            inp.write(block)
                finally:
                    dst.execute("select pg_replication_origin_session_reset()")
            row = dst.execute(sql.SQL("select count(*) from {}").format(
                sql.Identifier(table))).fetchone()
            copied[table] = int(row[0]) if row else 0
    return copied


def add_region(existing: Mapping[str, RegionDb] | Iterable[RegionDb], new: RegionDb, *,
               donor: str | None = None, migrate: bool = True, streaming: str = "on",
               timeout: float = 120.0) -> AddRegionReport:
    """Bring a new, empty region into a running cluster (see the module docstring).

    Migrates `new` (unless `migrate=False`), copies all data once from `donor` (default:
    the first existing region) and wires `new` both ways with every existing region. The
    new region must not take writes until this returns. Raises WiringError if `new` already
    has data or subscriptions, or if the donor is not replicating cleanly from every other
    region. On failure, what was created for `new` is dropped and its tables emptied.
    """
    started = time.monotonic()
    regions = _as_map(existing)
    if new.name in regions:
        raise WiringError(f"{new.name} is already part of the cluster")
    if not regions:
        raise WiringError("no existing region to join")
    if ident(new.name) in {ident(n) for n in regions}:
        raise WiringError(f"{new.name} collides with an existing region name")
    d = regions[donor] if donor is not None else next(iter(regions.values()))
    others = [r for r in regions.values() if r.name != d.name]

    if migrate:
        from region_node.migrate import upgrade

        upgrade(new.dsn)
    with _connect(new.dsn) as conn:
        if _replicated_rows(conn):
            raise WiringError(f"{new.name} already holds replicated rows; it must join empty")
        if conn.execute("""select 1 from pg_subscription where subdbid =
                           (select oid from pg_database where datname = current_database())""",
                        ).fetchone():
            raise WiringError(f"{new.name} already has subscriptions")

    # The donor must be replicating from every other region, or its snapshot would miss
    # (or be stuck behind) some region's data and the new region's stream from that region
    # would start at a gap.
    donor_subs: dict[str, dict[str, Any]] = {}
    for status in subscription_status(d.dsn):
        if status["publisher"] is not None:
            donor_subs[status["publisher"]] = status
    for other in others:
        got = donor_subs.get(other.name)
        if got is None or not got["enabled"] or got["tables_not_ready"]:
            raise WiringError(f"donor {d.name} is not replicating from {other.name}")
        if any(got["conflicts"].values()):
            # The new region would start exactly where the donor is stuck.
            raise WiringError(f"donor {d.name}'s subscription to {other.name} has conflicts "
                              f"{got['conflicts']}: repair them first")
    unknown = set(donor_subs) - set(regions)
    if unknown:
        raise WiringError(f"donor {d.name} also subscribes to {sorted(unknown)}, which are not "
                          "in `existing`: the new region would miss their changes")

    for region in regions.values():
        _drop_slot_if_idle(region.dsn, slot_name(region.name, new.name))  # failed attempts
    create_publication(new.dsn)

    start_lsns: dict[str, str | None] = {}
    paused_at: float | None = None
    paused_for = 0.0
    snapshot_lsn = ""
    rows: dict[str, int] = {}
    try:
        # 1. The new region's subscriptions, disabled: they exist so their replication
        #    origins can stamp the copied rows; their slots are made below.
        for region in regions.values():
            host, port = region.endpoint_for(new.name)
            subscribe(new.dsn, new.name, region.name, host, port, dbname=region.dbname,
                      create_slot=False, enabled=False, streaming=streaming,
                      user=region.replication_user)
        with _connect(new.dsn) as conn:
            new_origin = {r["publisher"]: f"pg_{r['subid']}" for r in
                          (status_row(x) for x in conn.execute(STATUS_SQL))}

        # 2. Freeze the donor's view of every other region: pause its subscriptions.
        paused_at = time.monotonic()
        for other in others:
            set_enabled(d.dsn, other.name, False)
        with _connect(d.dsn) as conn:
            _wait_workers_gone(conn, [int(donor_subs[o.name]["subid"]) for o in others],
                               timeout=30.0)
            for other in others:
                start_lsns[other.name] = _origin_lsn(conn, int(donor_subs[other.name]["subid"]))
            origin_ids = {r["roname"]: int(r["roident"]) for r in conn.execute(
                "select roident, roname from pg_replication_origin")}

        # 3. Streams from the other regions: copies of the donor's slots, resuming where the
        #    donor stopped.
        for other in others:
            with _connect(other.dsn) as conn:
                conn.execute("select pg_copy_logical_replication_slot(%s, %s)",
                             (slot_name(other.name, d.name), slot_name(other.name, new.name)))

        # 4. The donor's own stream and a snapshot that matches it exactly.
        repl, snapshot, snapshot_lsn = _slot_with_snapshot(d.dsn, slot_name(d.name, new.name))
        src = psycopg.connect(_libpq(d.dsn), connect_timeout=10)
        try:
            src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            src.read_only = True
            try:
                src.execute(sql.SQL("set transaction snapshot {}").format(sql.Literal(snapshot)))
            finally:
                repl.close()
            # The snapshot is held by `src` now: the donor can apply again.
            for other in others:
                set_enabled(d.dsn, other.name, True)
            paused_for = time.monotonic() - paused_at
            paused_at = None

            # 5. Copy, each row stamped with the origin its owner's changes arrive with.
            origin_expr = sql.SQL("(pg_xact_commit_timestamp_origin(t.xmin)).roident")
            known: list[int] = [0]
            groups: list[tuple[sql.Composable, str]] = [
                (sql.SQL("{} = 0").format(origin_expr), new_origin[d.name])]
            for other in others:
                roident = origin_ids.get(f"pg_{donor_subs[other.name]['subid']}")
                if roident is not None:
                    known.append(roident)
                    groups.append((sql.SQL("{} = {}").format(origin_expr, sql.Literal(roident)),
                                   new_origin[other.name]))
            # Rows whose origin the donor no longer knows (commit timestamps truncated,
            # repair writes): attributed to the donor.
            groups.append((sql.SQL("coalesce({} not in ({}), true)").format(
                origin_expr, sql.SQL(", ").join(sql.Literal(k) for k in known)),
                new_origin[d.name]))
            rows = _copy_tables(src, new.dsn, groups)
            src.commit()
        finally:
            src.close()

        # 6. Start every stream of the new region.
        with _connect(new.dsn) as conn:
            for other in others:
                if start_lsns[other.name] is not None:
                    conn.execute("select pg_replication_origin_advance(%s, %s::pg_lsn)",
                                 (new_origin[other.name], start_lsns[other.name]))
        for region in regions.values():
            set_enabled(new.dsn, region.name, True)
    except BaseException:
        log.exception("adding %s failed; dropping what was created for it", new.name)
        for region in regions.values():
            with suppress(Exception):
                unsubscribe(new.dsn, region.name)
            with suppress(Exception):
                _drop_slot_if_idle(region.dsn, slot_name(region.name, new.name))
        with suppress(Exception), _connect(new.dsn) as conn:
            conn.execute(sql.SQL("truncate {}").format(
                sql.SQL(", ").join(sql.Identifier(t) for t in REPLICATED_TABLES)))
        raise
    finally:
        if paused_at is not None:
            for other in others:
                try:
                    set_enabled(d.dsn, other.name, True)
                except Exception:
                    log.exception("could not resume %s's subscription to %s", d.name, other.name)
            paused_for = time.monotonic() - paused_at

    # 7. Every existing region follows the new one (nothing to copy: it has no rows of its
    #    own yet, and its copied rows predate these slots).
    for region in regions.values():
        host, port = new.endpoint_for(region.name)
        subscribe(region.dsn, region.name, new.name, host, port, dbname=new.dbname,
                  streaming=streaming, user=new.replication_user)
    wait_until_replicating(new.dsn, timeout=timeout)
    for region in regions.values():
        wait_until_replicating(region.dsn, timeout=timeout, publishers=[new.name])
    report = AddRegionReport(new.name, d.name, snapshot_lsn, start_lsns, rows,
                             round(paused_for, 3), round(time.monotonic() - started, 3))
    log.info("region %s joined: %s", new.name, report)
    return report


# --------------------------------------------------------------------------- conflict repair


def _key_where(key: Mapping[str, Any]) -> sql.Composed:
    return sql.SQL(" and ").join(
        sql.SQL("{} = {}").format(sql.Identifier(col), sql.Placeholder()) for col in key)


def _row_and_origin(dsn: str, table: str, key: Mapping[str, Any]
                    ) -> tuple[dict[str, Any] | None, int | None, int | None]:
    """(row, xid of its last write, replication origin id of that write; 0 = local)."""
    with _connect(dsn) as conn:
        got = conn.execute(sql.SQL(
            "select to_jsonb(t) as row, t.xmin::text::bigint as xid,"
            " (pg_xact_commit_timestamp_origin(t.xmin)).roident as origin"
            " from {} t where {}").format(sql.Identifier(table), _key_where(key)),
            list(key.values())).fetchone()
    if got is None:
        return None, None, None
    return got["row"], int(got["xid"]), (None if got["origin"] is None else int(got["origin"]))


def _commit_lsn(publisher: RegionDb, stuck_subscriber: str, xid: int) -> str:
    """Commit LSN (as the apply worker's `finish LSN`) of transaction `xid` on `publisher`.

    Peeks, with pgoutput, a temporary copy of `stuck_subscriber`'s slot (the copy starts
    where the stuck subscriber will resume, so the transaction is still ahead of it).
    """
    tmp = f"pc_repair_{ident(publisher.name)}_{int(time.time() * 1000) % 10**9}"
    with _connect(publisher.dsn) as conn:
        conn.execute("select pg_copy_logical_replication_slot(%s, %s, true)",
                     (slot_name(publisher.name, stuck_subscriber), tmp))
        try:
            for rec in conn.execute(
                    "select data from pg_logical_slot_peek_binary_changes(%s, null, null,"
                    " 'proto_version', '1', 'publication_names', %s, 'origin', 'none')",
                    (tmp, PUBLICATION)):
                data = bytes(rec["data"])
                # Begin message: 'B', Int64 final (commit) LSN, Int64 commit time, Int32 xid.
                if data[:1] == b"B" and int.from_bytes(data[17:21], "big") == xid % 2**32:
                    lsn = int.from_bytes(data[1:9], "big")
                    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:08X}"
        finally:
            conn.execute("select pg_drop_replication_slot(%s)", (tmp,))
    raise WiringError(f"transaction {xid} is not pending on {publisher.name}'s slot for "
                      f"{stuck_subscriber}")


def _lsn_int(lsn: str | None) -> int:
    if not lsn:
        return 0
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def delete_unpublished(dsn: str, table: str, key: Mapping[str, Any]) -> int:
    """Delete a row in a session bound to the `paycluster_repair` replication origin, so no
    `origin = none` subscription forwards the delete. Returns the number of rows deleted."""
    with _connect(dsn) as conn:
        conn.execute(
            """select pg_replication_origin_create(%s)
                where not exists (select 1 from pg_replication_origin where roname = %s)""",
            (REPAIR_ORIGIN, REPAIR_ORIGIN))
        conn.execute("select pg_replication_origin_session_setup(%s)", (REPAIR_ORIGIN,))
        try:
            cur = conn.execute(sql.SQL("delete from {} where {}").format(
                sql.Identifier(table), _key_where(key)), list(key.values()))
            return cur.rowcount
        finally:
            conn.execute("select pg_replication_origin_session_reset()")


def resolve_duplicate_key(regions: Mapping[str, RegionDb] | Iterable[RegionDb], *, table: str,
                          key: Mapping[str, Any], winner: str, timeout: float = 60.0,
                          acknowledge: bool = True) -> list[str]:
    """Repair an `insert_exists` conflict: the row `key` of `table` was inserted in several
    regions; make the `winner`'s row the only one everywhere (see the module docstring).

    Returns the actions taken, in order. With `acknowledge` the conflict counters of the
    subscriptions involved are reset once every region holds the winner's row.
    """
    by_name = _as_map(regions)
    if winner not in by_name:
        raise ValueError(f"unknown winner region {winner!r}")
    actions: list[str] = []
    rows = {name: _row_and_origin(r.dsn, table, key) for name, r in by_name.items()}
    winning_row = rows[winner][0]
    if winning_row is None:
        raise WiringError(f"{winner} has no row {dict(key)} in {table}")
    losers = {name: int(xid) for name, (row, xid, origin) in rows.items()
              if name != winner and row is not None and origin == 0 and xid is not None}
    if not losers:
        raise WiringError(f"no region other than {winner} inserted {dict(key)} itself")

    finish = {name: _commit_lsn(by_name[name], winner, xid) for name, xid in losers.items()}
    to_delete: set[str] = set(losers)
    for name, region in by_name.items():
        with _connect(region.dsn) as conn:
            for loser, lsn in finish.items():
                if loser == name:
                    continue
                sub = _subscription(conn, subscription_name(loser))
                if sub is None:
                    continue
                if _lsn_int(_origin_lsn(conn, int(sub["oid"]))) > _lsn_int(lsn):
                    to_delete.add(name)  # it applied the loser's insert already
                    continue
                conn.execute(sql.SQL("alter subscription {} skip (lsn = {})").format(
                    sql.Identifier(subscription_name(loser)), sql.Literal(lsn)))
                actions.append(f"{name}: skip {loser}'s transaction finished at {lsn}")
    for name in sorted(to_delete):
        if delete_unpublished(by_name[name].dsn, table, key):
            actions.append(f"{name}: deleted its {table} row {dict(key)} (unpublished)")

    deadline = time.monotonic() + timeout
    while True:
        pending = [n for n, r in by_name.items()
                   if _row_and_origin(r.dsn, table, key)[0] != winning_row]
        if not pending:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sorted(pending)} do not hold {winner}'s row after {timeout}s")
        time.sleep(0.1)
    if acknowledge:
        for name, region in by_name.items():
            for publisher in {winner, *losers} - {name}:
                reset_conflict_counters(region.dsn, publisher)
        actions.append("conflict counters reset")
    log.warning("resolved duplicate %s %s in favour of %s: %s", table, dict(key), winner,
                "; ".join(actions))
    return actions
