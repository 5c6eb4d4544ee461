"""Outbox -> JetStream -> idempotent consumer, against real PostgreSQL and NATS servers.

Every test gets its own stream and subject prefix, so tests sharing the session's NATS
server never see each other's messages or durable consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import sqlalchemy as sa
from nats.js.api import StorageType

from cluster.servers import NatsServer, RegionServers, start_nats
from region_node import schema
from region_node.config import RegionSettings
from region_node.db import Database
from region_node.event_bus import MSG_ID_HEADER, BusEvent, EventBus
from region_node.event_consumer import NotificationConsumer
from region_node.ids import new_id
from region_node.outbox import write_event
from region_node.outbox_relay import OutboxRelay

pytestmark = pytest.mark.integration

REGION = "us-east"
WAIT = 15.0
"""Upper bound of every wait below; a healthy run needs a small fraction of it."""


# --------------------------------------------------------------------------- helpers

async def wait_until(check: Callable[[], Awaitable[bool]], what: str,
                     within: float = WAIT) -> None:
    """Poll `check` until it is true; fail with `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


def make_settings(nats_url: str, **overrides: Any) -> RegionSettings:
    """Settings with a stream and subject prefix of this test's own."""
    tag = uuid.uuid4().hex[:12]
    values: dict[str, Any] = {
        "region": REGION, "nats_url": nats_url, "events_stream": f"TEST_EVENTS_{tag}",
        "events_subject_prefix": f"test.{tag}", "outbox_poll_seconds": 0.05,
        "outbox_batch": 50, **overrides}
    return RegionSettings(**values)


async def write_events(db: Database, count: int, region: str = REGION) -> list[uuid.UUID]:
    """Write `count` events the way business code does, one transaction each."""
    ids: list[uuid.UUID] = []
    for i in range(count):
        event_type = ("payment.succeeded", "payment.failed", "refund.created")[i % 3]

        async def step(conn: Any, i: int = i, event_type: str = event_type) -> uuid.UUID:
            return await write_event(conn, region=region, event_type=event_type,
                                     aggregate_id=new_id(), payload={"n": i, "amount": 100 + i})

        ids.append(await db.transaction(step))
    return ids


async def notifications(db: Database) -> dict[uuid.UUID, int]:
    """event_id -> deliveries."""
    async with db.engine.connect() as conn:
        rows = await conn.execute(sa.select(schema.notifications.c.event_id,
                                            schema.notifications.c.deliveries))
        return {row.event_id: row.deliveries for row in rows}


async def stream_state(settings: RegionSettings, durable: str | None = None) -> dict[str, int]:
    """Messages in the test's stream and, given a durable, what that consumer still owes."""
    nc = await nats.connect(settings.nats_url, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)
        state = {"messages": (await js.stream_info(settings.events_stream)).state.messages}
        if durable is not None:
            info = await js.consumer_info(settings.events_stream, durable)
            state["pending"] = info.num_pending or 0
            state["ack_pending"] = info.num_ack_pending or 0
        return state
    finally:
        await nc.close()


async def delete_stream(settings: RegionSettings) -> None:
    """Best-effort removal of a test's stream from the shared NATS server."""
    with contextlib.suppress(Exception):
        nc = await nats.connect(settings.nats_url, allow_reconnect=False, connect_timeout=2)
        try:
            await nc.jetstream(timeout=5).delete_stream(settings.events_stream)
        finally:
            await nc.close()


async def all_delivered(db: Database, ids: list[uuid.UUID], settings: RegionSettings,
                        consumer: NotificationConsumer) -> bool:
    """Every id recorded and the durable consumer has nothing left to deliver or ack."""
    if set(await notifications(db)) != set(ids):
        return False
    with contextlib.suppress(Exception):  # the server may still be coming back
        state = await stream_state(settings, consumer.durable)
        return state["pending"] == 0 and state["ack_pending"] == 0
    return False


class Workers:
    """Background workers (relay/consumer `run` loops) sharing one stop event."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, worker: OutboxRelay | NotificationConsumer) -> asyncio.Task[None]:
        """Run `worker.run(stop)` in a task."""
        task = asyncio.create_task(worker.run(self.stop))
        self.tasks.append(task)
        return task

    def assert_alive(self) -> None:
        """No worker has died (they must survive every outage)."""
        for task in self.tasks:
            assert not task.done(), f"worker died: {task.exception() if task.done() else ''}"

    async def shutdown(self, grace: float = 5.0) -> None:
        """Set stop; every worker must return within `grace` seconds (cancelled otherwise)."""
        self.stop.set()
        if not self.tasks:
            return
        done, pending = await asyncio.wait(self.tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        assert not pending, "a worker did not stop when asked"
        for task in done:
            assert task.exception() is None, task.exception()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """The test's fresh database."""
    database = Database(db_url, pool_size=5, max_overflow=5)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
async def workers() -> AsyncIterator[Workers]:
    """Workers stopped (and checked to stop promptly) at teardown."""
    group = Workers()
    try:
        yield group
    finally:
        await group.shutdown()


@pytest.fixture
async def shared_settings(servers: RegionServers) -> AsyncIterator[RegionSettings]:
    """Settings on the session's NATS server, with a private stream removed afterwards."""
    settings = make_settings(servers.nats.url)
    try:
        yield settings
    finally:
        await delete_stream(settings)


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """A NATS server of this test's own (a one-element list, so a restart can replace it)."""
    holder = [start_nats(tmp_path / "nats")]
    try:
        yield holder
    finally:
        for server in holder:
            server.stop()


# --------------------------------------------------------------------------- tests

async def test_events_reach_notifications_exactly_once(
        db: Database, shared_settings: RegionSettings, workers: Workers) -> None:
    """(a) Every outbox event is published and recorded once, under its own id."""
    settings = shared_settings
    relay = OutboxRelay(db, settings)
    consumer = NotificationConsumer(db, settings, fetch_timeout=0.5)
    ids = await write_events(db, 30)
    assert await relay.backlog() == 30

    workers.start(relay)
    workers.start(consumer)
    await wait_until(lambda: all_delivered(db, ids, settings, consumer), "30 notifications")

    assert await relay.backlog() == 0
    assert await notifications(db) == dict.fromkeys(ids, 1)
    assert (await stream_state(settings))["messages"] == 30

    async with db.engine.connect() as conn:
        outbox_rows = {r.id: r for r in await conn.execute(sa.select(schema.outbox))}
        recorded = list(await conn.execute(sa.select(schema.notifications)))
    for row in recorded:
        source = outbox_rows[row.event_id]
        assert row.event_type == source.event_type
        assert row.aggregate_id == source.aggregate_id
        assert row.payload == source.payload
        assert row.payload["id"] == str(row.event_id)

    # Subject layout and dedupe header, read back from the stream itself.
    nc = await nats.connect(settings.nats_url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        first = await js.get_msg(settings.events_stream, seq=1)
        config = (await js.stream_info(settings.events_stream)).config
    finally:
        await nc.close()
    first_row = outbox_rows[min(ids)]
    assert first.subject == f"{settings.events_subject_prefix}.{REGION}.{first_row.event_type}"
    assert first.headers is not None
    assert first.headers[MSG_ID_HEADER] == str(first_row.id)
    assert config.subjects == [f"{settings.events_subject_prefix}.>"]
    assert config.storage == StorageType.FILE
    assert config.duplicate_window >= 120


async def test_relay_restart_after_crash_between_publish_and_mark(
        db: Database, shared_settings: RegionSettings, workers: Workers) -> None:
    """(b) Rows re-sent after a crash are deduplicated: one message, one notification."""
    settings = shared_settings.model_copy(update={"outbox_batch": 10})
    consumer = NotificationConsumer(db, settings, fetch_timeout=0.5)
    workers.start(consumer)
    ids = await write_events(db, 60)

    # First relay: stopped as soon as it has published something.
    first = OutboxRelay(db, settings)
    first_stop = asyncio.Event()
    first_task = asyncio.create_task(first.run(first_stop))
    try:
        await wait_until(lambda: _backlog_at_most(first, 50), "the first batch to be published")
    finally:
        first_stop.set()
        await asyncio.wait_for(first_task, 5)

    # The crash: the oldest published rows were acked by JetStream but never marked.
    outbox = schema.outbox
    async with db.engine.begin() as conn:
        remarked = list((await conn.execute(
            sa.select(outbox.c.id).where(outbox.c.published_at.is_not(None))
            .order_by(outbox.c.id).limit(15))).scalars())
        await conn.execute(outbox.update().where(outbox.c.id.in_(remarked))
                           .values(published_at=None))
    assert len(remarked) >= 10
    assert await first.backlog() >= len(remarked)

    second = OutboxRelay(db, settings)
    workers.start(second)
    await wait_until(lambda: all_delivered(db, ids, settings, consumer), "60 notifications")

    # The consumer may have every notification (from the first relay's publishes) before
    # the second relay's first pass: wait for that pass to mark the re-sent rows.
    await wait_until(lambda: _backlog_at_most(second, 0), "the re-sent rows to be marked")
    # JetStream dropped the re-sent copies (Nats-Msg-Id), so the effect ran once each.
    assert (await stream_state(settings))["messages"] == 60
    assert await notifications(db) == dict.fromkeys(ids, 1)


async def test_two_relays_never_publish_the_same_row(
        db: Database, shared_settings: RegionSettings) -> None:
    """SKIP LOCKED: concurrent relays split the outbox, no row is published twice."""
    settings = shared_settings.model_copy(update={"outbox_batch": 7})
    published: list[uuid.UUID] = []

    class RecordingBus(EventBus):
        async def publish(self, event: BusEvent) -> Any:
            published.append(event.id)
            await asyncio.sleep(0.002)  # widen the window in which the relays overlap
            return await super().publish(event)

    ids = await write_events(db, 80)
    relays = [OutboxRelay(db, settings, bus=RecordingBus(settings)) for _ in range(2)]

    async def drain(relay: OutboxRelay) -> int:
        total = 0
        deadline = time.monotonic() + WAIT
        while await relay.backlog() > 0 and time.monotonic() < deadline:
            total += await relay.run_once()
        return total

    try:
        counts = await asyncio.gather(*(drain(r) for r in relays))
    finally:
        for relay in relays:
            await relay.bus.close()
    assert sum(counts) == 80
    assert all(count > 0 for count in counts), counts  # both really worked
    assert sorted(published) == sorted(ids)  # no id sent twice
    assert (await stream_state(settings))["messages"] == 80


async def test_bus_outage_outbox_grows_then_drains(
        db: Database, own_nats: list[NatsServer], workers: Workers) -> None:
    """(c) With NATS down, writes succeed and queue up; after it returns, all drain once."""
    server = own_nats[0]
    settings = make_settings(server.url)
    relay = OutboxRelay(db, settings, max_backoff=0.5)
    consumer = NotificationConsumer(db, settings, fetch_timeout=0.5, max_backoff=0.5)
    workers.start(relay)
    workers.start(consumer)

    before = await write_events(db, 10)
    await wait_until(lambda: all_delivered(db, before, settings, consumer),
                     "the events written before the outage")

    server.stop()
    await wait_until(lambda: _bus_down(relay), "the relay to notice the outage")

    during = await write_events(db, 15)  # the payment path never touches the bus
    assert await relay.backlog() == 15
    # A fresh relay while the server is down: nothing published, no exception.
    probe = OutboxRelay(db, settings, bus=EventBus(settings, connect_timeout=0.5))
    try:
        assert await probe.run_once() == 0
    finally:
        await probe.close()
    during += await write_events(db, 5)
    assert await relay.backlog() == 20
    workers.assert_alive()

    # Same port and data dir: the stream and the durable consumer come back with it.
    own_nats[0] = start_nats(server.data_dir, port=server.port)

    everything = before + during
    await wait_until(lambda: all_delivered(db, everything, settings, consumer),
                     "the backlog to drain after NATS returned")
    assert await relay.backlog() == 0
    assert await notifications(db) == dict.fromkeys(everything, 1)
    assert (await stream_state(settings))["messages"] == 30
    workers.assert_alive()


async def _backlog_at_most(relay: OutboxRelay, limit: int) -> bool:
    return await relay.backlog() <= limit


async def _bus_down(relay: OutboxRelay) -> bool:
    return not relay.bus.is_connected and not relay.bus_available
