"""Fan-out: turn this region's new outbox events into one delivery per interested endpoint.

The outbox is local to the region that wrote the event, so only that region ever fans an
event out: no two regions deliver the same event. A trigger on the outbox adds every new
event to `webhook_pending_events` in the event's own transaction (migration 0006). A
batch of pending rows is claimed with `FOR UPDATE SKIP LOCKED`, its deliveries
(replicated) and queue rows (local) are inserted and the pending rows deleted, all in one
transaction: after a crash either everything of the batch exists or the rows are still
pending and fanned out again (at least once; the unique (endpoint, event) key keeps it to
one delivery each).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema

DLV = schema.webhook_deliveries
Q = schema.webhook_queue

# Prebuilt statements for what runs every `webhook_poll_seconds` (no SQLAlchemy
# compilation or cache-key work per pass).
_PENDING = sa.text("""
    select o.id, o.event_type, o.aggregate_id, o.payload, o.created_at
      from webhook_pending_events p join outbox o on o.id = p.event_id
     where p.region = :region
     order by p.event_id limit :limit
       for update of p skip locked
""")
_SUBSCRIBERS = sa.text("""
    select e.id, e.principal_id, e.event_types, e.receives_all from webhook_endpoints e
     where not exists (select 1 from webhook_endpoint_deletions d where d.endpoint_id = e.id)
""")
_DONE = sa.text(
    "delete from webhook_pending_events where event_id = any(cast(:ids as uuid[]))")
# No endpoint at all: a batch of pending events is dropped in one statement, without
# reading the events (their payloads are only needed to pick and sign deliveries).
_DROP = sa.text("""
    delete from webhook_pending_events where event_id in (
        select event_id from webhook_pending_events where region = :region
         order by event_id limit :limit for update skip locked)
    returning event_id
""")


@dataclass(frozen=True)
class Subscriber:
    """What the fan-out needs of a live endpoint."""

    id: uuid.UUID
    principal_id: uuid.UUID
    event_types: tuple[str, ...]
    receives_all: bool

    def wants(self, event_type: str) -> bool:
        """`*` takes everything, `payment.*` a family, anything else one exact type."""
        for pattern in self.event_types:
            if pattern == "*" or pattern == event_type:
                return True
            if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
                return True
        return False


def event_body(envelope: dict[str, Any], created_at: datetime) -> str:
    """The bytes a receiver gets: the outbox envelope (`id`, `type`, `region`, `data`) plus
    `created` (unix seconds), as compact JSON with sorted keys."""
    return json.dumps({**envelope, "created": int(created_at.timestamp())},
                      separators=(",", ":"), sort_keys=True)


def _parties(event_type: str, data: dict[str, Any]) -> list[str]:
    """Account ids an event is about, read from its payload."""
    if event_type.startswith("order."):
        data = data.get("payment") or {}
    return [str(data[k]) for k in ("payer", "payee") if data.get(k)]


async def _order_parties(conn: AsyncConnection, order_ids: list[uuid.UUID]
                         ) -> dict[uuid.UUID, list[str]]:
    """Payer and payee of orders whose event carries no payment (settled orders)."""
    if not order_ids:
        return {}
    rows = (await conn.execute(
        sa.select(schema.orders.c.id, schema.payments.c.payer_id, schema.payments.c.payee_id)
        .join(schema.payments, schema.payments.c.id == schema.orders.c.payment_id)
        .where(schema.orders.c.id.in_(order_ids)))).all()
    return {r.id: [str(r.payer_id), str(r.payee_id)] for r in rows}


async def _principals_of(conn: AsyncConnection, account_ids: set[str]
                         ) -> dict[str, uuid.UUID | None]:
    """accounts.principal_id (migration 0005) of every account this region has a copy of."""
    if not account_ids:
        return {}
    rows = (await conn.execute(
        sa.text("select id, principal_id from accounts where id = any(:ids)"),
        {"ids": [uuid.UUID(a) for a in account_ids]})).all()
    return {str(r.id): r.principal_id for r in rows}


async def fan_out(conn: AsyncConnection, *, region: str, limit: int,
                  new_delivery_id: Callable[[], uuid.UUID],
                  wait_for_parties: timedelta) -> tuple[int, int]:
    """Fan out up to `limit` pending outbox events of `region` in the caller's transaction.

    Returns (events done, deliveries created). An event about an account this region has
    not replicated yet (a cross-region payee) is left for a later pass, for at most
    `wait_for_parties` after it was written; after that it goes to whoever is known.
    """
    subscribers = [Subscriber(r.id, r.principal_id, tuple(r.event_types), r.receives_all)
                   for r in (await conn.execute(_SUBSCRIBERS)).all()]
    if not subscribers:
        return len((await conn.execute(_DROP, {"region": region, "limit": limit})).all()), 0
    events = (await conn.execute(_PENDING, {"region": region, "limit": limit})).all()
    if not events:
        return 0, 0
    principals: dict[str, uuid.UUID | None] = {}
    parties: dict[uuid.UUID, list[str]] = {}
    if any(not s.receives_all for s in subscribers):
        for e in events:
            parties[e.id] = _parties(e.event_type, e.payload.get("data") or {})
        missing_orders = [e.aggregate_id for e in events
                          if e.event_type.startswith("order.") and not parties[e.id]]
        by_order = await _order_parties(conn, missing_orders)
        for e in events:
            if not parties[e.id]:
                parties[e.id] = by_order.get(e.aggregate_id, [])
        principals = await _principals_of(conn, {a for p in parties.values() for a in p})

    now = datetime.now(UTC)
    done: list[uuid.UUID] = []
    rows: list[dict[str, Any]] = []
    bodies: dict[uuid.UUID, tuple[str, datetime]] = {}
    for e in events:
        owners = {principals.get(a) for a in parties.get(e.id, [])}
        unknown = any(a not in principals for a in parties.get(e.id, []))
        if unknown and now - e.created_at < wait_for_parties:
            continue  # the account's row has not replicated here yet: look again later
        done.append(e.id)
        targets = [s for s in subscribers if s.wants(e.event_type)
                   and (s.receives_all or s.principal_id in owners)]
        if targets:
            bodies[e.id] = (event_body(e.payload, e.created_at), e.created_at)
        rows += [{"id": new_delivery_id(), "endpoint_id": s.id, "event_id": e.id,
                  "event_type": e.event_type, "region": region} for s in targets]
    created = 0
    if rows:
        # A delivery that exists already (a batch fanned out twice) returns no row, so it
        # gets no second queue row.
        # executemany form: one compiled statement, sent in batches (insertmanyvalues).
        inserted = (await conn.execute(
            insert(DLV).on_conflict_do_nothing(constraint="uq_webhook_delivery")
            .returning(DLV.c.id, DLV.c.endpoint_id, DLV.c.event_id), rows)).all()
        if inserted:
            await conn.execute(Q.insert(), [
                {"delivery_id": r.id, "endpoint_id": r.endpoint_id, "event_id": r.event_id,
                 "body": bodies[r.event_id][0], "created_at": bodies[r.event_id][1]}
                for r in inserted])
        created = len(inserted)
    if done:
        await conn.execute(_DONE, {"ids": done})
    return len(done), created
