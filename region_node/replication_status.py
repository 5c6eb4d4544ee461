"""How a region's database names and reports its logical-replication subscriptions: the
contract between the node (whose convergence monitor reads them in its own database,
`region_node.replication_monitor`) and `replication.wiring`, which creates them.

The subscription on region R for publisher P is ``sub_<P>`` (region names sanitized by
`ident`: ``eu-west`` -> ``eu_west``), and its comment records
``{"publisher": P, "subscriber": R}``. `STATUS_SQL` reads every subscription of the current
database with its apply worker and PostgreSQL 18 counters; `status_row` normalizes a row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

CONFLICT_COLUMNS: tuple[str, ...] = (
    "confl_insert_exists", "confl_update_origin_differs", "confl_update_exists",
    "confl_update_missing", "confl_delete_origin_differs", "confl_delete_missing",
    "confl_multiple_unique_conflicts",
)
"""PostgreSQL 18's conflict counters in `pg_stat_subscription_stats` (verified on 18.6)."""


def ident(region: str) -> str:
    """A region name as a lower-case SQL identifier fragment (`eu-west` -> `eu_west`)."""
    out = re.sub(r"[^a-z0-9_]", "_", region.strip().lower())
    if not out or not re.search(r"[a-z0-9]", out):
        raise ValueError(f"region name {region!r} has no usable characters")
    return out


def subscription_name(publisher_region: str) -> str:
    """Name of the subscription (on any subscriber) to `publisher_region`."""
    return f"sub_{ident(publisher_region)}"


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
Run by `replication.wiring` (psycopg) and the node's monitor (SQLAlchemy)."""


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
