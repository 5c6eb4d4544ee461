"""Cutting a dead (or isolated) region's stream off the survivors, and making every
survivor hold exactly the same prefix of it.

When region A dies, each survivor has applied A's stream up to its own position (the
origin progress of its subscription to A: the end LSN of the last A transaction it
applied). The positions differ by whatever was in flight on each link. If the new owner
B has applied more of A's transactions than survivor C, C would never get the rest (A's
stream is gone, and B never forwards A's changes: ``origin = none``), and B's later
updates of those accounts would land on C's older copies: C's balances would no longer
equal its journal. The reverse (C ahead of B) is just as bad.

So before the takeover (`replication.failover.crash_takeover`):

1. `cut_off`: every survivor disables its subscription to A and, once the apply worker
   has exited, reads its position. From now on nothing of A's tail is applied silently,
   even if A comes back.
2. The survivor furthest ahead has every A transaction any survivor has.
3. `align`: every other survivor (the new owner too) receives the rows the one furthest
   ahead has from A and it lacks
   (and loses those A deleted), written in a session bound to its own replication
   origin of A's subscription (so the rows look as if A's stream had applied them, and
   ``session_replication_role = replica`` as in an apply worker: no triggers, no FK
   checks); then its origin progress is advanced to that survivor's position. Rows
   are compared by primary key as JSON (``row_to_json``), restricted to rows whose last
   change came from A on either side.

Afterwards every survivor holds A's stream up to one position P, recorded in the
takeover (``ownership_takeovers.positions``): A's transactions after P are its lost
tail (`replication.reconcile`).
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
from psycopg import sql

from region_node.schema import REPLICATED_TABLES
from replication.errors import ReplicationError
from replication.libpq import libpq_url, lsn_int
from replication.wiring import set_enabled, subscription_name


class AlignError(ReplicationError):
    """A survivor could not be cut off or aligned."""


def take_origin(conn: psycopg.Connection[Any], origin: str, deadline: float) -> None:
    """Set this session up as `origin`. The stopped apply worker leaves
    pg_stat_subscription a moment before its process has released the origin (55006
    object_in_use, "already active for PID ..."): retried until `deadline`."""
    while True:
        try:
            conn.execute("select pg_replication_origin_session_setup(%s)", (origin,))
            return
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(libpq_url(dsn), autocommit=True, connect_timeout=5)


def origin_of(conn: psycopg.Connection[Any], publisher: str) -> tuple[int, str, int | None]:
    """(subscription oid, origin name, origin id or None) of the subscription to
    `publisher` in the connected database; AlignError if there is none."""
    row = conn.execute(
        """select s.oid, o.roident from pg_subscription s
             left join pg_replication_origin o on o.roname = 'pg_' || s.oid::text
            where s.subname = %s and s.subdbid =
                  (select oid from pg_database where datname = current_database())""",
        (subscription_name(publisher),)).fetchone()
    if row is None:
        raise AlignError(f"no subscription to {publisher}")
    return int(row[0]), f"pg_{int(row[0])}", (None if row[1] is None else int(row[1]))


def position(conn: psycopg.Connection[Any], publisher: str) -> str | None:
    """Origin progress of the subscription to `publisher`: the end LSN of the last
    transaction of `publisher` applied here (None: nothing yet)."""
    _, name, _ = origin_of(conn, publisher)
    row = conn.execute("select remote_lsn::text from pg_replication_origin_status "
                       "where external_id = %s", (name,)).fetchone()
    lsn = row[0] if row else None
    return None if lsn in (None, "0/0", "0/00000000") else str(lsn)


def cut_off(dsn: str, publisher: str, timeout_seconds: float = 15.0,
            grace_seconds: float = 2.0) -> str | None:
    """Disable the subscription to `publisher` and return its position once its apply
    worker has exited (the position cannot move any more).

    An idle worker sees the disable within a second. One that is inside a remote
    transaction does not look until that transaction's end, which never comes when the
    publisher was cut off mid-stream (it would wait for `wal_receiver_timeout`, 60 s).
    After `grace_seconds` the worker is terminated: its unfinished transaction rolls
    back, and the position only ever counts committed ones."""
    set_enabled(dsn, publisher, False)
    with _connect(dsn) as conn:
        subid, _, _ = origin_of(conn, publisher)
        started = time.monotonic()
        kill_at = started + grace_seconds
        while conn.execute("select 1 from pg_stat_subscription where subid = %s "
                           "and pid is not null", (subid,)).fetchone():
            now = time.monotonic()
            if now - started > timeout_seconds:
                raise AlignError(f"apply worker of {subscription_name(publisher)} did not "
                                 f"stop within {timeout_seconds}s")
            if now >= kill_at:
                # Every worker of the subscription (a leader may have parallel ones).
                conn.execute("select pg_terminate_backend(pid) from pg_stat_subscription "
                             "where subid = %s and pid is not null", (subid,))
                kill_at = now + grace_seconds
            time.sleep(0.02)
        return position(conn, publisher)


def primary_key(conn: psycopg.Connection[Any], table: str) -> list[str]:
    """The primary key columns of `table`, in column order."""
    rows = conn.execute(
        """select a.attname from pg_index i
             join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
            where i.indrelid = %s::regclass and i.indisprimary order by a.attnum""",
        (table,)).fetchall()
    return [str(r[0]) for r in rows]


def _rows_from(conn: psycopg.Connection[Any], table: str, pk: list[str],
               roident: int | None) -> dict[str, str]:
    """pk (as JSON) -> row (as JSON) of the rows of `table` last changed by origin
    `roident` (rows whose origin is unknown are not included)."""
    if roident is None:
        return {}
    query = sql.SQL("select json_build_array({pk})::text, row_to_json(t)::text from {t} t "
                    "where (pg_xact_commit_timestamp_origin(t.xmin)).roident = %s").format(
        pk=sql.SQL(", ").join(sql.Identifier("t", c) for c in pk), t=sql.Identifier(table))
    return {str(k): str(v) for k, v in conn.execute(query, (roident,)).fetchall()}


def _rows_by_key(conn: psycopg.Connection[Any], table: str, pk: list[str],
                 keys: list[str]) -> dict[str, str]:
    if not keys:
        return {}
    query = sql.SQL("select json_build_array({pk})::text, row_to_json(t)::text from {t} t "
                    "where json_build_array({pk})::jsonb = any(%s::jsonb[])").format(
        pk=sql.SQL(", ").join(sql.Identifier("t", c) for c in pk), t=sql.Identifier(table))
    return {str(k): str(v) for k, v in conn.execute(query, (keys,)).fetchall()}


def align(source_dsn: str, target_dsn: str, publisher: str) -> dict[str, int]:
    """Make `target`'s copy of `publisher`'s rows equal to `source`'s (see the module
    docstring); both subscriptions to `publisher` must be cut off, and `source` at least
    as far ahead. Returns rows written per table (upserted + deleted)."""
    changed: dict[str, int] = {}
    with _connect(source_dsn) as src, _connect(target_dsn) as dst:
        src.execute("set timezone = 'UTC'")
        dst.execute("set timezone = 'UTC'")
        _, _, src_origin = origin_of(src, publisher)
        _, dst_name, dst_origin = origin_of(dst, publisher)
        src_lsn, dst_lsn = position(src, publisher), position(dst, publisher)
        if lsn_int(dst_lsn) > lsn_int(src_lsn):
            raise AlignError(f"the target is ahead of the source for {publisher} "
                             f"({dst_lsn} > {src_lsn})")
        plan: list[tuple[str, list[str], list[str], list[str]]] = []
        for table in REPLICATED_TABLES:
            pk = primary_key(src, table)
            if not pk:
                continue
            have = _rows_from(src, table, pk, src_origin)
            mine = _rows_from(dst, table, pk, dst_origin)
            theirs_there = _rows_by_key(dst, table, pk, [k for k in have if k not in mine])
            upserts = [row for key, row in have.items()
                       if mine.get(key, theirs_there.get(key)) != row]
            gone_keys = [k for k in mine if k not in have]
            still_there = _rows_by_key(src, table, pk, gone_keys)
            deletes = [k for k in gone_keys if k not in still_there]
            if upserts or deletes:
                plan.append((table, pk, upserts, deletes))
        take_origin(dst, dst_name, time.monotonic() + 10)
        try:
            with dst.transaction():
                dst.execute("set local session_replication_role = replica")
                if src_lsn is not None:
                    # The commit moves this origin's progress to the source's position.
                    dst.execute("select pg_replication_origin_xact_setup(%s::pg_lsn, now())",
                                (src_lsn,))
                for table, pk, upserts, deletes in plan:
                    cols = list(json.loads(upserts[0]).keys()) if upserts else []
                    for row in upserts:
                        dst.execute(sql.SQL(
                            "insert into {t} select * from json_populate_record(null::{t}, "
                            "%s::json) on conflict ({pk}) do update set {sets}").format(
                            t=sql.Identifier(table),
                            pk=sql.SQL(", ").join(sql.Identifier(c) for c in pk),
                            sets=sql.SQL(", ").join(
                                sql.SQL("{c} = excluded.{c}").format(c=sql.Identifier(c))
                                for c in cols)), (row,))
                    for key in deletes:
                        dst.execute(sql.SQL("delete from {t} t where json_build_array({pk})"
                                            "::jsonb = %s::jsonb").format(
                            t=sql.Identifier(table),
                            pk=sql.SQL(", ").join(sql.Identifier("t", c) for c in pk)), (key,))
                    changed[table] = len(upserts) + len(deletes)
        finally:
            dst.execute("select pg_replication_origin_session_reset()")
        if src_lsn is not None and position(dst, publisher) != src_lsn:
            # Nothing was written (no commit to carry the progress).
            dst.execute("select pg_replication_origin_advance(%s, %s::pg_lsn)",
                        (dst_name, src_lsn))
    return changed
