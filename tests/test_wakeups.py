"""Background workers are woken, not only polled (region_node/wakeups.py, probe.py).

A commit of this node that creates work for a worker wakes it at once, whatever its
interval; work written behind the node's back (a row by SQL) is found by the probe.
The waits below are generous bounds far under the long intervals the tests set, never
an upper bound on how fast a loaded machine reacts."""

from __future__ import annotations

import asyncio
import time
import uuid

import psycopg
import pytest

from region_node.config import RegionSettings
from region_node.wakeups import Wakeups
from tests.conftest import app_client
from tests.helpers import open_account

pytestmark = pytest.mark.integration

LONG = 600.0
"""An interval no test waits for: a reaction before it was a wake-up."""
WAIT = 30.0


def _unpublished(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select count(*) from outbox where published_at is null").fetchone()
    assert row is not None
    return int(row[0])


async def _wait_published(db_url: str) -> None:
    deadline = time.monotonic() + WAIT
    while _unpublished(db_url):
        assert time.monotonic() < deadline, "the outbox relay was not woken"
        await asyncio.sleep(0.05)


async def test_wait_returns_on_signal_and_on_stop() -> None:
    wake = Wakeups()
    stop = asyncio.Event()
    wake.signal("outbox")  # before the wait: it returns at once, woken
    assert await asyncio.wait_for(wake.wait("outbox", stop, LONG), WAIT)
    assert await asyncio.wait_for(wake.wait("webhooks", stop, LONG), WAIT), \
        "an outbox row also wakes the webhook fan-out"
    assert not await wake.wait("stock", stop, 0.01), "nothing signalled: the interval"
    waiter = asyncio.create_task(wake.wait("stock", stop, LONG))
    await asyncio.sleep(0)
    stop.set()
    assert not await asyncio.wait_for(waiter, WAIT)


async def test_a_commit_wakes_the_relay_without_its_interval(
        settings: RegionSettings, db_url: str) -> None:
    slow = settings.model_copy(update={"outbox_poll_seconds": LONG,
                                       "transfer_poll_seconds": LONG})
    async with app_client(slow) as client:
        payer = await open_account(client, deposit=10_000)  # general path: its events
        payee = await open_account(client, kind="merchant")
        await _wait_published(db_url)
        resp = await client.post("/v1/payments", json={
            "payer": payer, "payee": payee, "amount": 100, "currency": "USD"})
        assert resp.status_code == 201, resp.text
        await _wait_published(db_url)  # the relay's next poll is LONG away


async def test_a_row_written_behind_the_nodes_back_is_found_by_the_probe(
        settings: RegionSettings, db_url: str) -> None:
    probed = settings.model_copy(update={"outbox_poll_seconds": LONG,
                                         "transfer_poll_seconds": 0.1})
    async with app_client(probed) as client:
        await open_account(client)
        await _wait_published(db_url)
        event_id = uuid.uuid4()
        with psycopg.connect(db_url) as conn:
            conn.execute(
                "insert into outbox (id, region, event_type, aggregate_id, payload)"
                " values (%s, 'us-east', 'test.by_hand', %s, %s::jsonb)",
                (event_id, uuid.uuid4(),
                 f'{{"id": "{event_id}", "type": "test.by_hand", "region": "us-east",'
                 ' "data": {}}'))
        await _wait_published(db_url)  # no commit of the node woke the relay: the probe
