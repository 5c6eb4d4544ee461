"""A node paused past its ownership lease (SIGSTOP: a VM stall, a long GC pause) cannot
commit a write when it resumes: every write transaction carries a PostgreSQL
``transaction_timeout`` that ends before the lease does, and the database's timer does not
pause with the node (issue 12, item 4). Renewals were on schedule when the write began,
which is exactly the case an in-process fence cannot cover: the fence is paused too."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from cluster.lab import Cluster, start_cluster
from tests.helpers import check_ledger, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

LEASE_TTL = 3.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two regions (a node holds ownership leases once a quorum of several regions' Redis
    could let another region take over), stopped even if a test fails."""
    # A short claim lock: the paused request's claim may outlive it (its release needs a
    # valid lease, which the node may not hold yet when it resumes), and the retry takes
    # the dead claim over once the lock time has passed.
    cluster = start_cluster(tmp_path_factory.mktemp("lab"), regions=2, wan_scale=0,
                            extra_env={"PAYCLUSTER_OWNERSHIP_LEASE_TTL_SECONDS": str(LEASE_TTL),
                                       "PAYCLUSTER_IDEMPOTENCY_LOCK_SECONDS": "3"})
    try:
        yield cluster
    finally:
        cluster.stop()


def _blocked_writer(dsn: str) -> int | None:
    """The session of the node's write transaction waiting for our row lock."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "select a.pid from pg_stat_activity a join pg_locks l on l.pid = a.pid "
            "where l.locktype = 'advisory' and l.mode = 'ShareLock' "
            "and a.wait_event_type = 'Lock'").fetchone()
    return int(row[0]) if row else None


def _alive(dsn: str, pid: int) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("select 1 from pg_stat_activity where pid = %s",
                            (pid,)).fetchone() is not None


async def test_a_paused_node_cannot_commit_after_its_lease(lab: Cluster) -> None:
    region = lab.region(lab.names[0])
    assert region.node is not None
    dsn = region.dsn
    async with httpx.AsyncClient(base_url=region.api_url, timeout=60,
                                 headers=lab.auth_headers()) as http:
        resp = await http.post("/v1/accounts", json={"currency": "USD"})
        assert resp.status_code == 201, resp.text
        payer = resp.json()["id"]
        assert (await http.post(f"/v1/accounts/{payer}/deposits",
                                json={"amount": 1_000})).status_code == 201
        key = {"Idempotency-Key": f"pause-{uuid.uuid4()}"}
        # A withdrawal: a transaction of several statements, so the node can be paused
        # between two of them (an automatic payment is one statement on the hot path:
        # once its lock is free it commits at once, within the lease, paused node or not).
        body = {"amount": 400}
        path = f"/v1/accounts/{payer}/withdrawals"

        with psycopg.connect(dsn) as blocker:
            blocker.execute("select 1 from accounts where id = %s for update", (payer,))
            sent = asyncio.create_task(http.post(path, json=body, headers=key))
            writer = await asyncio.to_thread(wait_for, lambda: _blocked_writer(dsn), 30,
                                             "the withdrawal's write transaction to block")
            os.kill(region.node.pid, signal.SIGSTOP)
            try:
                blocker.rollback()  # the write could go on now, but its node is paused
                paused_at = time.monotonic()
                # The lease ends at most one ttl after its last renewal; the write's own
                # transaction_timeout ends before that. Checked while the node is still
                # paused: nothing in it can have ended the transaction.
                await asyncio.to_thread(
                    wait_for, lambda: not _alive(dsn, writer), LEASE_TTL + 5,
                    "the database to end the paused node's write transaction")
                assert time.monotonic() - paused_at <= LEASE_TTL + 5
            finally:
                os.kill(region.node.pid, signal.SIGCONT)
        answer = await sent
        assert answer.status_code == 503, answer.text

        assert (await http.get(f"/v1/accounts/{payer}")).json()["balance"] == 1_000, \
            "nothing committed after the lease ended"
        # The client's retry with the same key runs once, under a lease held again.
        deadline = time.monotonic() + 60
        while True:
            retry = await http.post(path, json=body, headers=key)
            if retry.status_code == 201:
                break
            assert retry.status_code in (503, 409), retry.text
            assert time.monotonic() < deadline, retry.text
            await asyncio.sleep(0.2)
        assert (await http.get(f"/v1/accounts/{payer}")).json()["balance"] == 600
    check_ledger(dsn).assert_sound()
