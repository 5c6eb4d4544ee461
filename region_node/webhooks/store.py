"""Webhook endpoints and their secrets in SQL: register, list, rotate, delete, read the log.

Every write is an insert (see migration 0006): an endpoint row never changes, a deletion
and a rotation are rows of their own. That keeps the replicated tables free of
`update_origin_differs` conflicts whichever region takes the request.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema
from region_node.errors import NotFound
from region_node.webhooks.signing import new_secret

EP = schema.webhook_endpoints
SEC = schema.webhook_secrets
DEL = schema.webhook_endpoint_deletions
DLV = schema.webhook_deliveries
ATT = schema.webhook_attempts


@dataclass(frozen=True)
class Endpoint:
    """A registered endpoint as the API shows it (never with its secrets)."""

    id: uuid.UUID
    principal_id: uuid.UUID
    url: str
    event_types: list[str]
    receives_all: bool
    home_region: str
    created_at: datetime

    def to_api(self) -> dict[str, Any]:
        """The public JSON shape."""
        return {"id": str(self.id), "object": "webhook_endpoint", "url": self.url,
                "event_types": list(self.event_types), "principal": str(self.principal_id),
                "receives_all": self.receives_all, "home_region": self.home_region,
                "created_at": self.created_at.isoformat()}


def _endpoint(row: Any) -> Endpoint:
    return Endpoint(id=row.id, principal_id=row.principal_id, url=row.url,
                    event_types=list(row.event_types), receives_all=row.receives_all,
                    home_region=row.home_region, created_at=row.created_at)


def not_deleted() -> sa.ColumnElement[bool]:
    return ~sa.exists().where(DEL.c.endpoint_id == EP.c.id)


def active_secrets_query(endpoint_ids: Iterable[uuid.UUID]) -> sa.Select[Any]:
    """(endpoint_id, secret) of every secret valid now, oldest first per endpoint.

    A secret is retired by its own `expires_at` or by any later secret of the same
    endpoint (a rotation) whose `previous_expire_at` has passed.
    """
    later = SEC.alias("later")
    return (sa.select(SEC.c.endpoint_id, SEC.c.secret)
            .where(SEC.c.endpoint_id.in_(list(endpoint_ids)),
                   sa.or_(SEC.c.expires_at.is_(None), SEC.c.expires_at > sa.func.now()),
                   ~sa.exists().where(later.c.endpoint_id == SEC.c.endpoint_id,
                                      later.c.id > SEC.c.id,
                                      later.c.previous_expire_at <= sa.func.now()))
            .order_by(SEC.c.endpoint_id, SEC.c.id))


async def active_secrets(conn: AsyncConnection,
                         endpoint_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    """Secrets to sign with, per endpoint (newest last)."""
    out: dict[uuid.UUID, list[str]] = {}
    for row in (await conn.execute(active_secrets_query(endpoint_ids))).all():
        out.setdefault(row.endpoint_id, []).append(row.secret)
    return out


async def create_endpoint(conn: AsyncConnection, *, endpoint_id: uuid.UUID,
                          secret_id: uuid.UUID, principal_id: uuid.UUID, url: str,
                          event_types: list[str], receives_all: bool,
                          home_region: str) -> tuple[Endpoint, str]:
    """Register an endpoint and its first secret; returns both (the secret only here)."""
    row = (await conn.execute(EP.insert().values(
        id=endpoint_id, principal_id=principal_id, url=url, event_types=event_types,
        receives_all=receives_all, home_region=home_region).returning(*EP.c))).one()
    secret = new_secret()
    await conn.execute(SEC.insert().values(id=secret_id, endpoint_id=endpoint_id, secret=secret))
    return _endpoint(row), secret


async def get_endpoint(conn: AsyncConnection, endpoint_id: uuid.UUID) -> Endpoint:
    """A live (not deleted) endpoint; NotFound otherwise."""
    row = (await conn.execute(sa.select(EP).where(EP.c.id == endpoint_id, not_deleted()))
           ).one_or_none()
    if row is None:
        raise NotFound(f"No such webhook endpoint: '{endpoint_id}'")
    return _endpoint(row)


async def list_endpoints(conn: AsyncConnection,
                         principal_id: uuid.UUID | None) -> list[Endpoint]:
    """Live endpoints of a principal (None: of everyone), oldest first."""
    query = sa.select(EP).where(not_deleted()).order_by(EP.c.id)
    if principal_id is not None:
        query = query.where(EP.c.principal_id == principal_id)
    return [_endpoint(r) for r in (await conn.execute(query)).all()]


async def rotate_secret(conn: AsyncConnection, *, endpoint_id: uuid.UUID, secret_id: uuid.UUID,
                        expire_old_after: timedelta) -> tuple[str, datetime]:
    """Add a new secret; the older ones stay valid for `expire_old_after` (meanwhile every
    delivery carries one signature per valid secret). Returns the secret and that time."""
    secret = new_secret()
    expire_at = (await conn.execute(
        SEC.insert().values(id=secret_id, endpoint_id=endpoint_id, secret=secret,
                            previous_expire_at=sa.func.now() + expire_old_after)
        .returning(SEC.c.previous_expire_at))).scalar_one()
    return secret, expire_at


async def delete_endpoint(conn: AsyncConnection, *, deletion_id: uuid.UUID,
                          endpoint_id: uuid.UUID, deleted_by: uuid.UUID | None) -> None:
    """Stop deliveries to an endpoint (a deletion row; pending retries are dropped)."""
    await conn.execute(DEL.insert().values(id=deletion_id, endpoint_id=endpoint_id,
                                           deleted_by=deleted_by))


async def delivery_log(conn: AsyncConnection, endpoint_id: uuid.UUID, *,
                       limit: int) -> list[dict[str, Any]]:
    """The endpoint's newest deliveries with every attempt (oldest attempt first)."""
    deliveries = (await conn.execute(
        sa.select(DLV).where(DLV.c.endpoint_id == endpoint_id)
        .order_by(DLV.c.id.desc()).limit(limit))).all()
    attempts: dict[uuid.UUID, list[dict[str, Any]]] = {}
    if deliveries:
        rows = (await conn.execute(
            sa.select(ATT).where(ATT.c.endpoint_id == endpoint_id,
                                 ATT.c.delivery_id.in_([d.id for d in deliveries]))
            .order_by(ATT.c.delivery_id, ATT.c.attempt))).all()
        for a in rows:
            attempts.setdefault(a.delivery_id, []).append({
                "attempt": a.attempt, "attempted_at": a.attempted_at.isoformat(),
                "status_code": a.status_code, "error": a.error, "duration_ms": a.duration_ms,
                "outcome": a.outcome,
                "next_attempt_at": a.next_attempt_at.isoformat() if a.next_attempt_at else None,
                "region": a.region})
    out = []
    for d in deliveries:
        tried = attempts.get(d.id, [])
        status = tried[-1]["outcome"] if tried else "pending"
        out.append({"id": str(d.id), "object": "webhook_delivery", "event_id": str(d.event_id),
                    "event_type": d.event_type, "region": d.region,
                    "status": "pending" if status == "retrying" else status,
                    "created_at": d.created_at.isoformat(), "attempts": tried})
    return out
