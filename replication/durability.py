"""Durability modes of a region (docs/architecture.md, "Durability modes"), settable at
runtime.

- ``local``: a commit is acknowledged when the region's own store has it; the other
  regions converge asynchronously (``synchronous_standby_names`` empty).
- ``regional``: the region names a failover **buddy**; the buddy's subscription to this
  region (its walsender's ``application_name`` is the slot name
  ``pc_<region>_to_<buddy>``, see `replication.wiring`) is the synchronous standby, so a
  commit returns only once the buddy has applied and flushed it: every acknowledged
  payment already exists in the buddy region. The price is one buddy round trip per
  commit, and commits wait while the buddy is unreachable.

Set with ``ALTER SYSTEM`` and a configuration reload, so it survives restarts and needs
no node restart. Commits that ask for ``synchronous_commit = off`` (idempotency claims)
never wait, by design: they guard no effect.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from replication.wiring import slot_name, subscription_name

log = logging.getLogger(__name__)

MODES = ("local", "regional")


@dataclass(frozen=True)
class Durability:
    """A region's durability mode as its store has it, and the buddy's standby state."""

    region: str
    mode: str
    buddy: str | None
    standby: str | None
    sync_state: str | None

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"region": self.region, "mode": self.mode, "buddy": self.buddy,
                "standby": self.standby, "sync_state": self.sync_state}


def _names_for(region: str, mode: str, buddy: str | None) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "local":
        return ""
    if not buddy or buddy == region:
        raise ValueError("regional mode needs a buddy region other than the region itself")
    return f'FIRST 1 ("{slot_name(region, buddy)}")'


def set_durability(dsn: str, region: str, mode: str, buddy: str | None = None,
                   buddy_dsn: str | None = None, timeout_seconds: float = 10.0) -> Durability:
    """Put `region` (its store at `dsn`) into `mode`; waits until new sessions see it.

    With `buddy_dsn`, the buddy's subscription to `region` flushes what it applies before
    it confirms it (``synchronous_commit = local``; the subscription default ``off`` makes
    the buddy confirm only after its WAL writer's next flush, some 200 ms later); `local`
    mode sets it back to ``off`` there. Not ``on``: with ``on`` the buddy's apply worker
    would itself wait for the buddy's own synchronous standby, and two regions that are
    each other's buddy (the default pairing) deadlock as soon as both apply a transaction
    at once - each apply worker waits for the other one to confirm. What the buddy applies
    originated elsewhere; it needs to be durable at the buddy, not replicated onwards
    synchronously.

    Going back to `local` is the way out when the buddy is unreachable, so it never depends
    on the buddy: the region's own setting changes first, and the buddy's subscription is
    changed only if the buddy answers (logged otherwise; it is harmless). Going to
    `regional` changes the buddy's subscription first, so the first synchronous commit
    already gets the prompt confirmation.
    """
    names = _names_for(region, mode, buddy)
    if buddy_dsn is not None and names:
        _buddy_subscription(buddy_dsn, region, "local")
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        if names:
            conn.execute(sql.SQL("alter system set synchronous_standby_names = {}")
                         .format(sql.Literal(names)))
        else:
            conn.execute("alter system reset synchronous_standby_names")
        conn.execute("select pg_reload_conf()")
    deadline = time.monotonic() + timeout_seconds
    while True:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("show synchronous_standby_names").fetchone()
        if row is not None and str(row[0]) == names:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{region}: synchronous_standby_names still {row} after reload")
        time.sleep(0.02)
    if buddy_dsn is not None and not names:
        try:
            _buddy_subscription(buddy_dsn, region, "off")
        except psycopg.Error as exc:
            log.warning("%s is local again; its buddy's subscription still commits "
                        "synchronously (harmless): %s", region, exc)
    return durability(dsn, region, [r for r in (region, buddy) if r])


def _buddy_subscription(buddy_dsn: str, region: str, synchronous_commit: str) -> None:
    """Set the buddy's subscription to `region` to `synchronous_commit`."""
    with psycopg.connect(buddy_dsn, autocommit=True, connect_timeout=5) as conn:
        # This catalog change must not itself wait for the buddy's own synchronous
        # standby, which may be the very region that is unreachable.
        conn.execute("set synchronous_commit = local")
        conn.execute(sql.SQL("alter subscription {} set (synchronous_commit = {})").format(
            sql.Identifier(subscription_name(region)), sql.Literal(synchronous_commit)))


def durability(dsn: str, region: str, regions: list[str] | None = None) -> Durability:
    """The mode `region`'s store is in, its buddy (found among `regions`, else the
    standby's name), and the buddy walsender's sync_state (``sync`` while the buddy keeps
    up; None if it is not connected)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("show synchronous_standby_names").fetchone()
        names = str(row[0]) if row else ""
        match = re.search(r'"?(pc_[a-z0-9_]+)"?', names)
        standby = match.group(1) if match else None
        state = None
        if standby is not None:
            got = conn.execute("select sync_state from pg_stat_replication "
                               "where application_name = %s", (standby,)).fetchone()
            state = str(got[0]) if got else None
    if standby is None:
        return Durability(region, "local", None, None, None)
    buddy = next((r for r in regions or [] if r != region and slot_name(region, r) == standby),
                 standby)
    return Durability(region, "regional", buddy, standby, state)
