"""Outbox relay: moves this region's outbox rows onto the event bus.

A row is marked published only after JetStream acked it, in the same transaction that
locked it. A crash between the ack and the commit leaves the row unpublished, so it is
sent again with the same `Nats-Msg-Id` and JetStream drops the copy (at-least-once
publish, deduplicated). While the bus is down the rows simply wait: the outbox grows and
drains later, and no payment ever fails because of the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from region_node import schema, wakeups
from region_node.config import RegionSettings
from region_node.db import Database
from region_node.event_bus import BusEvent, BusUnavailable, EventBus

log = logging.getLogger(__name__)

# Prebuilt statements (no SQLAlchemy compilation or cache-key work per pass): the relay
# runs every `outbox_poll_seconds` and after every full batch.
_CLAIM = sa.text("""
    select id, region, event_type, aggregate_id, payload from outbox
     where region = :region and published_at is null
     order by id limit :limit
       for update skip locked
""")
_MARK = sa.text("update outbox set published_at = now() where id = any(cast(:ids as uuid[]))")


class OutboxRelay:
    """Publishes unpublished outbox rows of `settings.region`, oldest first.

    Several relays (e.g. two node processes of one region) may run at once: each batch
    is claimed with `FOR UPDATE SKIP LOCKED`, so a row is worked by one relay at a time.
    Order across relays is then only approximate; consumers must not rely on it.
    """

    def __init__(self, db: Database, settings: RegionSettings, *, bus: EventBus | None = None,
                 max_backoff: float = 5.0) -> None:
        self.db = db
        self.settings = settings
        self._owns_bus = bus is None
        self.bus = bus if bus is not None else EventBus(settings)
        self.max_backoff = max_backoff
        self.bus_available = False
        """Whether the last `run_once` could reach the bus (drives the backoff)."""

    def _unpublished(self) -> sa.ColumnElement[bool]:
        return sa.and_(schema.outbox.c.region == self.settings.region,
                       schema.outbox.c.published_at.is_(None))

    async def backlog(self) -> int:
        """Number of this region's outbox rows not yet published (a /metrics gauge)."""
        async with self.db.engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count()).select_from(schema.outbox).where(self._unpublished()))
        return int(count or 0)

    async def run_once(self) -> int:
        """Publish up to `outbox_batch` rows; returns how many were acked and marked.

        Returns 0 without raising when the bus is unreachable (the rows stay unpublished).
        Database errors propagate; `run` logs them and retries.
        """
        if not await self.bus.connect():
            self.bus_available = False
            return 0
        self.bus_available = True
        # The row locks are held while publishing: that is what keeps a second relay off
        # these rows (it skips them) until they are marked and committed.
        async with self.db.engine.begin() as conn:
            rows = (await conn.execute(_CLAIM, {"region": self.settings.region,
                                                "limit": self.settings.outbox_batch})).all()
            acked = await self._publish(rows)
            if acked:
                await conn.execute(_MARK, {"ids": acked})
        return len(acked)

    async def _publish(self, rows: Sequence[sa.Row[Any]]) -> list[uuid.UUID]:
        """Publish `rows` in order; the ids of the leading rows JetStream acked.

        The first row goes alone (it finds out whether the bus and the stream are there,
        and recreates a lost stream once); the rest are in flight together on the one
        connection, so they reach the stream in id order and the batch costs one round
        trip instead of one per row. Only the acked prefix is marked: a row after a
        failure is sent again by a later batch, where its `Nats-Msg-Id` makes JetStream
        drop the copy if this one was stored after all."""
        events = [BusEvent(id=row.id, region=row.region, event_type=row.event_type,
                           aggregate_id=row.aggregate_id, envelope=dict(row.payload))
                  for row in rows]
        if not events:
            return []
        results: list[object] = [*await asyncio.gather(self.bus.publish(events[0]),
                                                       return_exceptions=True)]
        if not isinstance(results[0], BaseException):
            results += await asyncio.gather(*(self.bus.publish(e) for e in events[1:]),
                                            return_exceptions=True)
        acked: list[uuid.UUID] = []
        for event, result in zip(events, results, strict=False):
            if isinstance(result, BusUnavailable):
                # Stop at the first failure to keep id order; mark what was acked.
                self.bus_available = False
                log.warning("outbox relay: bus unavailable after %d of %d rows: %s",
                            len(acked), len(events), result)
                break
            if isinstance(result, BaseException):
                raise result
            acked.append(event.id)
        return acked

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set; never dies on errors (logs them and backs off).

        A full batch is followed at once by the next one, so a backlog drains at full
        speed; otherwise it waits `outbox_poll_seconds`, doubling up to `max_backoff`
        while the bus or the database is down.
        """
        poll = self.settings.outbox_poll_seconds
        delay = poll
        try:
            while not stop.is_set():
                failed = False
                published = 0
                try:
                    published = await self.run_once()
                except Exception:
                    failed = True
                    log.exception("outbox relay: batch failed; retrying")
                if failed or not self.bus_available:
                    delay = min(max(delay * 2, poll), max(self.max_backoff, poll))
                else:
                    delay = poll
                    if published >= self.settings.outbox_batch:
                        continue
                    # Woken by a commit that wrote an outbox row, or by the probe.
                    await self.db.wakeups.wait(wakeups.OUTBOX, stop, poll)
                    continue
                await _wait(stop, delay)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the bus connection if this relay opened it."""
        if self._owns_bus:
            await self.bus.close()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds` or until `stop` is set, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
