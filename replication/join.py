"""Adding a region to a running cluster (`add_region`): one copy from a donor's
snapshot, then streams from everyone.

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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql

from region_node.schema import REPLICATED_TABLES
from replication.libpq import libpq_url
from replication.wiring import (
    STATUS_SQL,
    RegionDb,
    WiringError,
    connect,
    create_publication,
    has_replicated_rows,
    ident,
    origin_lsn,
    region_map,
    set_enabled,
    slot_name,
    status_row,
    subscribe,
    subscription_status,
    unsubscribe,
    wait_until_replicating,
)

# The logger of the wiring this was split from: its log lines keep their logger name.
log = logging.getLogger("replication.wiring")


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
                       timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    while True:
        row = conn.execute(
            "select count(*) as n from pg_stat_subscription"
            " where subid = any(%s) and pid is not null",
            (subids,)).fetchone()
        if not row or not row["n"]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"apply workers of {subids} still running after {timeout_seconds}s")
        time.sleep(0.05)


def _drop_slot_if_idle(dsn: str, slot: str) -> None:
    with connect(dsn) as conn:
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
    conn = psycopg.connect(libpq_url(dsn), autocommit=True, replication="database",
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
    with psycopg.connect(libpq_url(dst_dsn), autocommit=True) as dst:
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
               timeout_seconds: float = 120.0) -> AddRegionReport:
    """Bring a new, empty region into a running cluster (see the module docstring).

    Migrates `new` (unless `migrate=False`), copies all data once from `donor` (default:
    the first existing region) and wires `new` both ways with every existing region. The
    new region must not take writes until this returns. Raises WiringError if `new` already
    has data or subscriptions, or if the donor is not replicating cleanly from every other
    region. On failure, what was created for `new` is dropped and its tables emptied.
    """
    started = time.monotonic()
    regions = region_map(existing)
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
    with connect(new.dsn) as conn:
        if has_replicated_rows(conn):
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
    paused_for_seconds = 0.0
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
        with connect(new.dsn) as conn:
            new_origin = {r["publisher"]: f"pg_{r['subid']}" for r in
                          (status_row(x) for x in conn.execute(STATUS_SQL))}

        # 2. Freeze the donor's view of every other region: pause its subscriptions.
        paused_at = time.monotonic()
        for other in others:
            set_enabled(d.dsn, other.name, False)
        with connect(d.dsn) as conn:
            _wait_workers_gone(conn, [int(donor_subs[o.name]["subid"]) for o in others],
                               timeout_seconds=30.0)
            for other in others:
                start_lsns[other.name] = origin_lsn(conn, int(donor_subs[other.name]["subid"]))
            origin_ids = {r["roname"]: int(r["roident"]) for r in conn.execute(
                "select roident, roname from pg_replication_origin")}

        # 3. Streams from the other regions: copies of the donor's slots, resuming where the
        #    donor stopped.
        for other in others:
            with connect(other.dsn) as conn:
                conn.execute("select pg_copy_logical_replication_slot(%s, %s)",
                             (slot_name(other.name, d.name), slot_name(other.name, new.name)))

        # 4. The donor's own stream and a snapshot that matches it exactly.
        repl, snapshot, snapshot_lsn = _slot_with_snapshot(d.dsn, slot_name(d.name, new.name))
        src = psycopg.connect(libpq_url(d.dsn), connect_timeout=10)
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
            paused_for_seconds = time.monotonic() - paused_at
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
        with connect(new.dsn) as conn:
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
        with suppress(Exception), connect(new.dsn) as conn:
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
            paused_for_seconds = time.monotonic() - paused_at

    # 7. Every existing region follows the new one (nothing to copy: it has no rows of its
    #    own yet, and its copied rows predate these slots).
    for region in regions.values():
        host, port = new.endpoint_for(region.name)
        subscribe(region.dsn, region.name, new.name, host, port, dbname=new.dbname,
                  streaming=streaming, user=new.replication_user)
    wait_until_replicating(new.dsn, timeout_seconds=timeout_seconds)
    for region in regions.values():
        wait_until_replicating(region.dsn, timeout_seconds=timeout_seconds,
                               publishers=[new.name])
    report = AddRegionReport(new.name, d.name, snapshot_lsn, start_lsns, rows,
                             round(paused_for_seconds, 3), round(time.monotonic() - started, 3))
    log.info("region %s joined: %s", new.name, report)
    return report
