"""The notification consumer: a durable JetStream pull consumer with an idempotent effect.

Delivery is at least once (a message is acked only after its effect committed, so a
crash or a lost ack means a redelivery); the effect is exactly once because it is keyed
by the event id: a redelivery only bumps `notifications.deliveries`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid

import nats.errors
import nats.js.errors
import sqlalchemy as sa
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node.config import RegionSettings
from region_node.db import Database
from region_node.event_bus import BusEvent, EventBus, MalformedEvent, event_subject

log = logging.getLogger(__name__)

# A batch's events in one statement; a redelivered id adds its copies to `deliveries`
# (the first delivery is the row's default 1, every further one adds 1). The batch is
# one JSON array: psycopg escapes a text[] parameter element by element in Python,
# which cost more than the insert itself.
_RECORD = sa.text("""
    insert into notifications (event_id, event_type, aggregate_id, payload, deliveries)
    select (e->>'id')::uuid, e->>'type', (e->>'agg')::uuid, e->'payload', (e->>'n')::int
      from jsonb_array_elements(cast(:batch as jsonb)) as e
    on conflict (event_id)
    do update set deliveries = notifications.deliveries + excluded.deliveries
""")


class NotificationConsumer:
    """Records every event of this region in `notifications`, once per event id.

    The durable consumer (`notifications-<region>` by default) lives in the server, so a
    restarted node, or a node that reconnects after a NATS restart, carries on from the
    last acked message. It only takes this region's subjects: `notifications` rows then
    have a single writer region, as every replicated table requires.
    """

    def __init__(self, db: Database, settings: RegionSettings, *, bus: EventBus | None = None,
                 durable: str | None = None, batch: int = 100, fetch_timeout: float = 1.0,
                 ack_wait: float = 30.0, max_backoff: float = 5.0) -> None:
        self.db = db
        self.settings = settings
        self._owns_bus = bus is None
        self.bus = bus if bus is not None else EventBus(settings)
        self.durable = durable or f"notifications-{settings.region}"
        self.filter_subject = event_subject(settings.events_subject_prefix, settings.region, ">")
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self.ack_wait = ack_wait
        self.max_backoff = max_backoff
        self._sub: JetStreamContext.PullSubscription | None = None

    async def _subscription(self) -> JetStreamContext.PullSubscription:
        if self._sub is None:
            # Creates the durable consumer if it does not exist, else binds to it.
            self._sub = await self.bus.jetstream.pull_subscribe(
                self.filter_subject, durable=self.durable, stream=self.settings.events_stream,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                    ack_wait=self.ack_wait, max_deliver=-1, max_ack_pending=10 * self.batch))
        return self._sub

    async def _drop_subscription(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def run_once(self) -> int:
        """Fetch one batch (waiting up to `fetch_timeout`), record it, ack it.

        Returns the number of events recorded; 0 when there was nothing to fetch or the
        bus is unreachable. Raises on database errors (after asking for redelivery) and on
        bus errors other than "nothing to fetch"; `run` handles both.
        """
        if not await self.bus.connect():
            return 0
        sub = await self._subscription()
        try:
            msgs = await sub.fetch(self.batch, timeout=self.fetch_timeout)
        except nats.errors.TimeoutError:
            return 0
        return await self.handle(msgs)

    async def handle(self, msgs: list[Msg]) -> int:
        """Record a batch of delivered messages in one transaction, then ack each."""
        events: list[tuple[Msg, BusEvent]] = []
        for msg in msgs:
            try:
                events.append((msg, BusEvent.from_msg(msg)))
            except MalformedEvent:
                # Redelivering a message we can never decode would loop forever; it stays
                # in the stream for inspection.
                log.exception("terminating malformed message on %s", msg.subject)
                with contextlib.suppress(Exception):
                    await msg.term()
        if not events:
            return 0

        # Deliveries per event id: a batch may hold two deliveries of one id (a
        # redelivery after ack_wait). One multi-row upsert cannot touch a row twice, so
        # the copies are counted here and added in one go: the same `deliveries` as one
        # upsert per delivery, in one statement (prebuilt: nothing compiled per batch).
        firsts: dict[uuid.UUID, BusEvent] = {}
        counts: dict[uuid.UUID, int] = {}
        for _, event in events:
            firsts.setdefault(event.id, event)
            counts[event.id] = counts.get(event.id, 0) + 1
        params = {"batch": json.dumps([
            {"id": str(i), "type": e.event_type, "agg": str(e.aggregate_id),
             "payload": e.envelope, "n": counts[i]} for i, e in firsts.items()])}

        async def record(conn: AsyncConnection) -> None:
            await conn.execute(_RECORD, params)

        try:
            await self.db.transaction(record)
        except Exception:
            # Not recorded: ask for a prompt redelivery instead of waiting for ack_wait.
            for msg, _ in events:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1.0)
            raise
        # Ack only after the commit. A lost ack means a redelivery, which the upsert
        # absorbs. The acks go out without waiting, and only the last one waits for the
        # server: it handles one connection's messages in order, so when that answer
        # comes every ack before it is in too ("acked" means the server has them), for
        # one round trip per batch instead of one per event.
        *rest, (last, _) = events
        for msg, _ in rest:
            await msg.ack()
        await last.ack_sync(timeout=self.bus.request_timeout)
        return len(events)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; survives NATS and database outages.

        Any failure drops the subscription, so the next round re-creates it (and the
        durable consumer, should the server have lost it), after a backoff that doubles
        up to `max_backoff`.
        """
        base = min(self.fetch_timeout, 0.2)
        delay = base
        try:
            while not stop.is_set():
                try:
                    if not await self.bus.connect():
                        delay = min(delay * 2, self.max_backoff)
                        await _wait(stop, delay)
                        continue
                    await self.run_once()
                    delay = base
                except Exception as exc:
                    if isinstance(exc, nats.errors.Error | nats.js.errors.Error | OSError):
                        log.warning("notification consumer: bus error, resubscribing: %r", exc)
                        # The server may have lost the stream with its store; check again.
                        self.bus.recheck_stream()
                    else:
                        log.exception("notification consumer: batch failed; retrying")
                    await self._drop_subscription()
                    delay = min(delay * 2, self.max_backoff)
                    await _wait(stop, delay)
        finally:
            await self.close()

    async def close(self) -> None:
        """Unsubscribe, and close the bus connection if this consumer opened it."""
        await self._drop_subscription()
        if self._owns_bus:
            await self.bus.close()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds` or until `stop` is set, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
