"""Transactional outbox: every state change writes its event in the same transaction.

The relay (region_node/outbox_relay.py) publishes rows to the event bus later, so a bus
outage never loses an event and never fails a payment.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema, wakeups
from region_node.ids import new_id


async def write_event(conn: AsyncConnection, *, region: str, event_type: str,
                      aggregate_id: uuid.UUID, payload: dict[str, Any]) -> uuid.UUID:
    """Append an event to the outbox inside the caller's transaction; returns its id.

    The id (UUIDv7) is the event's identity end to end: the relay sends it as the
    JetStream `Nats-Msg-Id` dedupe id and consumers key their effects on it.
    """
    event_id = new_id()
    wakeups.mark(conn, wakeups.OUTBOX)  # after the commit: the relay and the fan-out
    await conn.execute(schema.outbox.insert().values(
        id=event_id, region=region, event_type=event_type, aggregate_id=aggregate_id,
        payload={"id": str(event_id), "type": event_type, "region": region, "data": payload}))
    return event_id
