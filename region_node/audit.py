"""The audit trail: an append-only, replicated log of who did what through the API.

One row per mutating /v1 call and per refusal (401, 403): when, which region, which key
and principal, the action (``<area>.<route>``, e.g. ``payments.create``), the resource id,
the request id and the HTTP status. Rows are only ever inserted (UUIDv7 ids stamped with
the writing region), so they replicate without conflicts. See api/audit_trail.py for
where they are written.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema
from region_node.redact import scrub

L = schema.audit_log


async def record(conn: AsyncConnection, *, row_id: uuid.UUID, region: str,
                 key_id: uuid.UUID | None, principal_id: uuid.UUID | None, action: str,
                 resource: str | None, request_id: str | None, status: int) -> None:
    """Append one audit row (in the caller's transaction).

    Action and resource can carry a raw request path (refusals, unmatched routes), which a
    client controls: scrubbed like every other stored free text, so no card number or key
    lands in a replicated table."""
    await conn.execute(L.insert().values(
        id=row_id, region=region, key_id=key_id, principal_id=principal_id,
        action=scrub(action)[:200],
        resource=scrub(resource)[:200] if resource else None,
        request_id=request_id[:128] if request_id else None, status=status))


def _to_api(row: Any) -> dict[str, Any]:
    m = row._mapping
    return {"id": str(m["id"]), "object": "audit_event", "at": m["at"].isoformat(),
            "region": m["region"], "key_id": str(m["key_id"]) if m["key_id"] else None,
            "principal_id": str(m["principal_id"]) if m["principal_id"] else None,
            "action": m["action"], "resource": m["resource"], "request_id": m["request_id"],
            "status": m["status"]}


async def page(conn: AsyncConnection, *, limit: int, cursor: uuid.UUID | None = None,
               principal_id: uuid.UUID | None = None, action: str | None = None
               ) -> dict[str, Any]:
    """Audit rows, newest first (ids are time-ordered); `next_cursor` pages on."""
    query = sa.select(L).order_by(L.c.id.desc()).limit(limit + 1)
    if cursor is not None:
        query = query.where(L.c.id < cursor)
    if principal_id is not None:
        query = query.where(L.c.principal_id == principal_id)
    if action is not None:
        query = query.where(L.c.action == action)
    rows = (await conn.execute(query)).all()
    data = [_to_api(r) for r in rows[:limit]]
    more = len(rows) > limit
    return {"object": "list", "data": data, "has_more": more,
            "next_cursor": data[-1]["id"] if more else None}
