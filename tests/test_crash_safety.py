"""Crash safety: SIGKILL the node process in the middle of a payment load, restart it, and
show the ledger balanced and every acknowledged payment present exactly once.

Clients behave as a careful payments client does: every payment carries an
Idempotency-Key, and a request whose answer was lost (connection dropped by the crash) is
retried with the same key until it gets a definite answer.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from cluster.nodes import start_node
from cluster.servers import RegionServers
from tests.conftest import auth_headers
from tests.helpers import check_ledger

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

CLIENTS = 16
PAYMENTS_PER_CLIENT = 25


async def test_sigkill_during_load(servers: RegionServers, db_url: str, tmp_path: Path) -> None:
    node = start_node("us-east", servers, tmp_path, extra_env={
        "PAYCLUSTER_DATABASE_URL": db_url,
        # A claim left by the killed process is retried after 1 s instead of 60 s.
        "PAYCLUSTER_IDEMPOTENCY_LOCK_SECONDS": "1",
        "PAYCLUSTER_EVENTS_STREAM": f"CRASH_{uuid.uuid4().hex[:8]}",
        "PAYCLUSTER_EVENTS_SUBJECT_PREFIX": f"crash.{uuid.uuid4().hex[:8]}",
    })
    try:
        async with httpx.AsyncClient(base_url=node.api_url, timeout=10,
                                     headers=auth_headers()) as client:
            accounts = []
            for _ in range(8):
                acc = (await client.post("/v1/accounts", json={"currency": "USD"})).json()["id"]
                await client.post(f"/v1/accounts/{acc}/deposits", json={"amount": 20_000})
                accounts.append(acc)

            acknowledged: dict[str, str] = {}  # idempotency key -> payment id
            declined: set[str] = set()
            lost_answers = 0
            killed = asyncio.Event()
            quarter_done = asyncio.Event()

            async def send(key: str, body: dict[str, object]) -> None:
                nonlocal lost_answers
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        resp = await client.post("/v1/payments", json=body,
                                                 headers={"Idempotency-Key": key})
                    except httpx.TransportError:
                        lost_answers += 1  # the node died under us: same key again
                        await asyncio.sleep(0.2)
                        continue
                    if resp.status_code == 201:
                        acknowledged[key] = resp.json()["id"]
                        if len(acknowledged) >= CLIENTS * PAYMENTS_PER_CLIENT // 4:
                            quarter_done.set()
                        return
                    if resp.status_code == 402:
                        declined.add(key)
                        return
                    # 409: the dead process's claim has not timed out yet; 503: store busy.
                    assert resp.status_code in (409, 503), resp.text
                    await asyncio.sleep(0.2)
                pytest.fail(f"payment {key} never got a definite answer")

            async def one_client(seed: int) -> None:
                rng = random.Random(seed)
                for _ in range(PAYMENTS_PER_CLIENT):
                    payer, payee = rng.sample(accounts, 2)
                    await send(f"crash-{uuid.uuid4()}", {
                        "payer": payer, "payee": payee, "amount": rng.randint(1, 3_000),
                        "currency": "USD"})

            async def crash_and_restart() -> None:
                await quarter_done.wait()
                node.kill()
                killed.set()
                await asyncio.to_thread(node.restart)

            await asyncio.gather(crash_and_restart(),
                                 *(one_client(i) for i in range(CLIENTS)))
            assert killed.is_set()

        assert lost_answers > 0, "the crash must have hit requests in flight"
        assert len(acknowledged) + len(declined) == CLIENTS * PAYMENTS_PER_CLIENT
        check_ledger(db_url).assert_sound()
        with psycopg.connect(db_url) as conn:
            stored = [r[0] for r in conn.execute("select id::text from payments").fetchall()]
            postings = dict(conn.execute(
                "select payment_id::text, count(distinct journal_id) from journal_entries "
                "where payment_id is not null group by payment_id").fetchall())
        assert len(stored) == len(set(stored))
        assert set(acknowledged.values()) == set(stored), "acknowledged = stored, no extras"
        assert all(postings[p] == 1 for p in stored), "each payment posted exactly once"
    finally:
        node.stop()


class _Fence:
    """The one part of a write guard that answers for an ended session: whether its fence
    ran just now (the leases themselves need a lock quorum: tests/test_leases.py)."""

    def __init__(self, fenced: bool) -> None:
        self.fenced = fenced

    def budget_ms(self, home: str) -> int | None:
        return None

    def check(self, home: str, epoch: int) -> None:
        return None

    def token(self, home: str) -> int | None:
        return None

    def fenced_recently(self) -> bool:
        return self.fenced


@pytest.mark.parametrize("fenced", [False, True], ids=["shutdown", "lease-fence"])
async def test_a_write_ended_by_the_server_is_a_retryable_503(db_url: str,
                                                              fenced: bool) -> None:
    """A session the server ends mid-write (pg_terminate_backend: what the ownership
    lease's fence does to writers still running when the lease runs out, or a shutdown)
    is a 503 the client retries, never a 500, and nothing of the step is committed. Its
    code says which: ``lease_lost`` when the region's guard has just fenced its writers
    (the same code as a write refused before it began), else ``region_unavailable``."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncConnection

    from region_node import write_guard
    from region_node.db import Database
    from region_node.errors import RegionUnavailable

    region = f"fence-{uuid.uuid4().hex[:8]}"
    write_guard.register_guard(region, _Fence(fenced))
    db = Database(db_url, pool_size=2, region=region)
    started = asyncio.Event()

    async def step(conn: AsyncConnection) -> None:
        await conn.execute(text("create table ended_write (id int)"))
        pid = (await conn.execute(text("select pg_backend_pid()"))).scalar_one()
        started.set()
        await conn.execute(text("select pg_sleep(30), :pid"), {"pid": pid})

    async def terminate() -> None:
        # `started` is set before the sleep is sent: end the session once the sleep runs
        # (an async connection, so the step's statement is not held up by this one).
        await started.wait()
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                cur = await conn.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity "
                    "where state = 'active' and query like 'select pg_sleep(30)%'")
                if await cur.fetchall():
                    return
                await asyncio.sleep(0.02)
            pytest.fail("the step's sleep never ran")

    try:
        with pytest.raises(RegionUnavailable) as raised:
            await asyncio.gather(db.transaction(step), terminate())
        assert raised.value.http_status == 503
        assert raised.value.code == ("lease_lost" if fenced else "region_unavailable")
        with psycopg.connect(db_url) as conn:
            assert conn.execute("select to_regclass('ended_write')").fetchone() == (None,)
    finally:
        write_guard.register_guard(region, None)
        await db.dispose()
