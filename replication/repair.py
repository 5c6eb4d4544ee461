"""Repairing an ``insert_exists`` conflict (`resolve_duplicate_key`): the row two
regions inserted is made the winner's everywhere.

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

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from psycopg import sql

from replication.libpq import lsn_int, lsn_text
from replication.wiring import (
    PUBLICATION,
    RegionDb,
    WiringError,
    connect,
    ident,
    origin_lsn,
    region_map,
    reset_conflict_counters,
    slot_name,
    subscription_name,
    subscription_row,
)

# The logger of the wiring this was split from: its log lines keep their logger name.
log = logging.getLogger("replication.wiring")

REPAIR_ORIGIN = "paycluster_repair"
"""Replication origin that marks repair writes, so `origin = none` never forwards them."""


def _key_where(key: Mapping[str, Any]) -> sql.Composed:
    return sql.SQL(" and ").join(
        sql.SQL("{} = {}").format(sql.Identifier(col), sql.Placeholder()) for col in key)


def _row_and_origin(dsn: str, table: str, key: Mapping[str, Any]
                    ) -> tuple[dict[str, Any] | None, int | None, int | None]:
    """(row, xid of its last write, replication origin id of that write; 0 = local)."""
    with connect(dsn) as conn:
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
    with connect(publisher.dsn) as conn:
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
                    return lsn_text(lsn)
        finally:
            conn.execute("select pg_drop_replication_slot(%s)", (tmp,))
    raise WiringError(f"transaction {xid} is not pending on {publisher.name}'s slot for "
                      f"{stuck_subscriber}")


def delete_unpublished(dsn: str, table: str, key: Mapping[str, Any]) -> int:
    """Delete a row in a session bound to the `paycluster_repair` replication origin, so no
    `origin = none` subscription forwards the delete. Returns the number of rows deleted."""
    with connect(dsn) as conn:
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
                          key: Mapping[str, Any], winner: str, timeout_seconds: float = 60.0,
                          acknowledge: bool = True) -> list[str]:
    """Repair an `insert_exists` conflict: the row `key` of `table` was inserted in several
    regions; make the `winner`'s row the only one everywhere (see the module docstring).

    Returns the actions taken, in order. With `acknowledge` the conflict counters of the
    subscriptions involved are reset once every region holds the winner's row.
    """
    by_name = region_map(regions)
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
        with connect(region.dsn) as conn:
            for loser, lsn in finish.items():
                if loser == name:
                    continue
                sub = subscription_row(conn, subscription_name(loser))
                if sub is None:
                    continue
                if lsn_int(origin_lsn(conn, int(sub["oid"]))) > lsn_int(lsn):
                    to_delete.add(name)  # it applied the loser's insert already
                    continue
                conn.execute(sql.SQL("alter subscription {} skip (lsn = {})").format(
                    sql.Identifier(subscription_name(loser)), sql.Literal(lsn)))
                actions.append(f"{name}: skip {loser}'s transaction finished at {lsn}")
    for name in sorted(to_delete):
        if delete_unpublished(by_name[name].dsn, table, key):
            actions.append(f"{name}: deleted its {table} row {dict(key)} (unpublished)")

    deadline = time.monotonic() + timeout_seconds
    while True:
        pending = [n for n, r in by_name.items()
                   if _row_and_origin(r.dsn, table, key)[0] != winning_row]
        if not pending:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sorted(pending)} do not hold {winner}'s row after "
                               f"{timeout_seconds}s")
        time.sleep(0.1)
    if acknowledge:
        for name, region in by_name.items():
            for publisher in {winner, *losers} - {name}:
                reset_conflict_counters(region.dsn, publisher)
        actions.append("conflict counters reset")
    log.warning("resolved duplicate %s %s in favour of %s: %s", table, dict(key), winner,
                "; ".join(actions))
    return actions
