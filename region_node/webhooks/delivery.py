"""The webhook delivery worker: fan out new events, POST due deliveries, log every attempt.

Each pass (one at a time per worker, so it holds at most one pooled connection and never
competes with payments for the pool):
1. records the outcome of finished HTTP attempts (one transaction for all of them);
2. fans out this region's new outbox events (region_node/webhooks/fanout.py);
3. leases due queue rows (`FOR UPDATE SKIP LOCKED`, so several nodes of a region share
   the queue) and starts one POST task per row, up to `webhook_concurrency` in flight.

Delivery is at least once: a node that crashes mid-POST leaves the lease to expire and
the row is sent again, with the same event id, which receivers dedupe on. A 2xx answer is
delivered; anything else is retried with exponential backoff and jitter until the event
is `webhook_max_age_seconds` old, then the delivery is marked failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema, wakeups
from region_node.node import Node
from region_node.redact import scrub
from region_node.webhooks.fanout import fan_out
from region_node.webhooks.metrics import WebhookMetrics
from region_node.webhooks.signing import SIGNATURE_HEADER, sign
from region_node.webhooks.store import DEL, EP, active_secrets

log = logging.getLogger(__name__)

Q = schema.webhook_queue
ATT = schema.webhook_attempts
DLV = schema.webhook_deliveries

ERROR_MAX_CHARS = 200
MAX_BACKOFF_SECONDS = 5.0
IDLE_CLAIM_SECONDS = 1.0
PURGE_EVERY_SECONDS = 3600.0
PURGE_BATCH = 10_000
# A lease outlives the longest POST (the client's total timeout) by this much, so it does
# not expire under a live task; a node that died mid-POST delays the retry by this long.
LEASE_MARGIN_SECONDS = 5.0

# `_claim` when no delivery is in flight on this node: the due rows, at most `cap` per
# endpoint (the earliest due first), leased for `lease`.
_CLAIM_IDLE = sa.text("""
    with ready as (
        select delivery_id, due_at,
               row_number() over (partition by endpoint_id order by due_at) as rn
          from webhook_queue
         where due_at <= now() and (lease_until is null or lease_until < now())),
    due as (
        select q.delivery_id from webhook_queue q
         where q.delivery_id in (select delivery_id from ready where rn <= :cap)
           and q.due_at <= now() and (q.lease_until is null or q.lease_until < now())
         order by q.due_at limit :limit
           for update of q skip locked)
    update webhook_queue set lease_until = now() + :lease
     where delivery_id in (select delivery_id from due)
    returning delivery_id, endpoint_id, event_id, body, attempts, due_at, lease_until,
              created_at
""")


def lease_seconds(timeout: float) -> float:
    """How long a claimed delivery stays reserved for the node that claimed it."""
    return 2 * timeout + LEASE_MARGIN_SECONDS


def retry_delay(failures: int, *, base: float, cap: float,
                rand: float | None = None) -> float:
    """Seconds to wait after the `failures`-th failed attempt.

    Exponential (`base`, 2x, 4x, ... up to `cap`) with "equal jitter": half the step
    fixed, half random, so receivers that fail together are not retried in lockstep.
    """
    # A float power, its exponent bounded: an int 2 ** 1100 does not fit a float
    # (OverflowError), while 2.0 ** 1000 * base at worst becomes inf, and min() takes cap.
    step = min(cap, base * 2.0 ** min(max(failures - 1, 0), 1000))
    r = random.random() if rand is None else rand
    return step / 2 + r * step / 2


def short_error(exc: BaseException) -> str:
    """A one-line, bounded description of a failed POST (never the response body)."""
    # Masked before it is stored and replicated: an exception may quote the URL, and a
    # receiver's URL may carry a token or a card-like number.
    text = scrub(f"{type(exc).__name__}: {exc}".replace("\n", " "))
    return text[:ERROR_MAX_CHARS]


@dataclass(frozen=True)
class Job:
    """One leased delivery to attempt."""

    delivery_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: uuid.UUID
    body: str
    attempt: int
    created_at: datetime
    url: str | None
    secrets: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt, waiting to be recorded."""

    job: Job
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def delivered(self) -> bool:
        """2xx means the receiver has it."""
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookWorker:
    """Delivers the webhook events of this node's region (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings
        self._inflight: set[asyncio.Task[None]] = set()
        self._busy: Counter[uuid.UUID] = Counter()
        """Deliveries in flight per endpoint."""
        self._outcomes: list[Outcome] = []
        # Set by the write paths and the probe too (an event waiting for its fan-out).
        self._wake = node.db.wakeups.event(wakeups.WEBHOOKS)
        self._session: aiohttp.ClientSession | None = None
        # When the queue is next worth a look (see run_once); time.monotonic() values.
        self._claim_now = False
        self._idle_claim_at = 0.0
        self._retry_due: float | None = None
        self._purge_at = 0.0
        self.metrics = WebhookMetrics(node.region, node.metrics.registry)

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; survives database and receiver failures."""
        poll = self.settings.webhook_poll_seconds
        delay = poll
        stopper = asyncio.create_task(self._wake_on(stop))
        try:
            while not stop.is_set():
                busy = False
                try:
                    busy = await self.run_once()
                    delay = poll
                except Exception:
                    # The database is down or failing: back off (up to MAX_BACKOFF) instead
                    # of logging a traceback every poll.
                    delay = min(delay * 2, max(MAX_BACKOFF_SECONDS, poll))
                    log.exception("webhook worker: pass failed; retrying in %.1f s", delay)
                if busy:
                    continue
                wake = self.node.db.wakeups
                await wake.spaced(wakeups.WEBHOOKS)  # passes no closer than its min gap
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._idle_wait(delay))
                self._wake.clear()
                wake.passed(wakeups.WEBHOOKS)
        finally:
            stopper.cancel()
            await self.close()

    def _idle_wait(self, delay: float) -> float:
        """How long to wait for a wake-up: `delay`, or while the node's probe runs (it
        wakes this worker for new events) until the next claim is due (a retry, the
        idle claim), bounded by the wake-ups' fallback."""
        wake = self.node.db.wakeups
        if not wake.probing or delay > self.settings.webhook_poll_seconds:
            return delay
        due = self._idle_claim_at
        if self._retry_due is not None:
            due = min(due, self._retry_due)
        return max(delay, min(due - time.monotonic(), wake.timeout(delay)))

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def run_once(self) -> bool:
        """One pass; True when there is probably more to do right away."""
        await self.flush()
        if time.monotonic() >= self._purge_at:
            self._purge_at = time.monotonic() + PURGE_EVERY_SECONDS
            await self.purge()
        s = self.settings
        marked, created = await self.node.db.transaction(lambda conn: fan_out(
            conn, region=self.node.region, limit=s.webhook_batch,
            new_delivery_id=lambda: self.node.new_id(self.node.region),
            wait_for_parties=timedelta(seconds=s.replication_slo_seconds)))
        capacity = s.webhook_concurrency - len(self._inflight)
        jobs: list[Job] = []
        # An idle node does not query the queue every poll: only when it just queued
        # deliveries, when attempts finished or the last claim was full (more may be due),
        # when a retry it scheduled is due, or every IDLE_CLAIM_SECONDS (retries scheduled
        # and leases dropped by other nodes of the region).
        now = time.monotonic()
        if capacity > 0 and (created or self._claim_now or now >= self._idle_claim_at
                             or (self._retry_due is not None and now >= self._retry_due)):
            if self._retry_due is not None and now >= self._retry_due:
                self._retry_due = None
            self._idle_claim_at = now + IDLE_CLAIM_SECONDS
            jobs = await self.node.db.transaction(lambda conn: self._claim(conn, capacity))
            self._claim_now = len(jobs) >= capacity
            for job in jobs:
                self._start(job)
        return marked >= s.webhook_batch or (capacity > 0 and len(jobs) >= capacity)

    def _start(self, job: Job) -> None:
        task = asyncio.create_task(self._attempt(job))
        self._inflight.add(task)
        self._busy[job.endpoint_id] += 1

        def done(t: asyncio.Task[None]) -> None:
            self._inflight.discard(t)
            self._busy[job.endpoint_id] -= 1
            if self._busy[job.endpoint_id] <= 0:
                del self._busy[job.endpoint_id]

        task.add_done_callback(done)

    async def close(self) -> None:
        """Let in-flight POSTs finish (bounded by their timeout), record them, close."""
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=self.settings.webhook_timeout_seconds + 1)
        for task in list(self._inflight):
            task.cancel()  # its lease expires and the delivery is retried: nothing is lost
        with contextlib.suppress(Exception):
            await self.flush()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ claiming

    async def _claim(self, conn: AsyncConnection, limit: int) -> list[Job]:
        lease = timedelta(seconds=lease_seconds(self.settings.webhook_timeout_seconds))
        cap = self.settings.webhook_endpoint_concurrency
        # At most `cap` deliveries per endpoint in flight on this node, so a receiver that
        # hangs until the timeout holds a few of the worker's slots, never all of them.
        room: dict[uuid.UUID, int] = {e: max(cap - n, 0) for e, n in self._busy.items()}
        if not room:
            # Nothing in flight (an idle node's every-second look): the same claim as
            # below with every endpoint's room at `cap`, prebuilt (no compilation).
            rows = (await conn.execute(_CLAIM_IDLE, {"cap": cap, "limit": limit,
                                                     "lease": lease})).all()
            return await self._jobs(conn, rows)
        ready = sa.and_(Q.c.due_at <= sa.func.now(),
                        sa.or_(Q.c.lease_until.is_(None), Q.c.lease_until < sa.func.now()))
        full = [e for e, r in room.items() if r == 0]
        if full:
            ready = sa.and_(ready, Q.c.endpoint_id.not_in(full))
        allowed: sa.ColumnElement[int] = (
            sa.case(room, value=Q.c.endpoint_id, else_=cap) if room else sa.literal(cap))
        ranked = (sa.select(Q.c.delivery_id, allowed.label("allowed"),
                            sa.func.row_number().over(partition_by=Q.c.endpoint_id,
                                                      order_by=Q.c.due_at).label("rn"))
                  .where(ready).subquery())
        due = (sa.select(Q.c.delivery_id)
               .where(Q.c.delivery_id.in_(sa.select(ranked.c.delivery_id)
                                          .where(ranked.c.rn <= ranked.c.allowed)), ready)
               .order_by(Q.c.due_at).limit(limit).with_for_update(skip_locked=True))
        rows = (await conn.execute(
            Q.update().where(Q.c.delivery_id.in_(due.scalar_subquery()))
            .values(lease_until=sa.func.now() + lease).returning(*Q.c))).all()
        return await self._jobs(conn, rows)

    async def _jobs(self, conn: AsyncConnection, rows: Sequence[Any]) -> list[Job]:
        """The claimed queue rows with their endpoints' URLs and active secrets."""
        if not rows:
            return []
        endpoint_ids = {r.endpoint_id for r in rows}
        urls = {r.id: r.url for r in (await conn.execute(
            sa.select(EP.c.id, EP.c.url).where(
                EP.c.id.in_(endpoint_ids),
                ~sa.exists().where(DEL.c.endpoint_id == EP.c.id)))).all()}
        secrets = await active_secrets(conn, endpoint_ids)
        return [Job(delivery_id=r.delivery_id, endpoint_id=r.endpoint_id, event_id=r.event_id,
                    body=r.body, attempt=r.attempts + 1, created_at=r.created_at,
                    url=urls.get(r.endpoint_id),
                    secrets=tuple(secrets.get(r.endpoint_id, ())))
                for r in rows]

    # ------------------------------------------------------------------ sending

    def session(self) -> aiohttp.ClientSession:
        """The HTTP client (opened on first use, inside the running loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.settings.webhook_concurrency),
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_seconds),
                headers={"User-Agent": "paycluster-webhooks/1"})
        return self._session

    async def _attempt(self, job: Job) -> None:
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        if job.url is None:
            error = "endpoint deleted"
        elif not job.secrets:
            error = "endpoint has no active secret"
        else:
            body = job.body.encode()
            headers = {"Content-Type": "application/json",
                       SIGNATURE_HEADER: sign(body, job.secrets),
                       "Paycluster-Event-Id": str(job.event_id),
                       "Paycluster-Delivery-Attempt": str(job.attempt)}
            try:
                # Redirects are not followed: the registered URL is the only destination.
                async with self.session().post(job.url, data=body, headers=headers,
                                               allow_redirects=False) as resp:
                    status = resp.status
                    await resp.read()
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection refused, timeout, reset, bad URL...
                error = short_error(exc)
        self._outcomes.append(Outcome(job, status, error,
                                      int((time.perf_counter() - started) * 1000)))
        self._wake.set()

    # ------------------------------------------------------------------ retention

    async def purge(self) -> int:
        """Delete this region's delivery log older than `webhook_log_retention_seconds`
        (deliveries no longer queued, and their attempts); returns the deliveries removed.

        Only rows this region inserted: a replicated delete of rows no one else ever wrote
        cannot conflict anywhere.
        """
        keep = timedelta(seconds=self.settings.webhook_log_retention_seconds)
        region = self.node.region

        async def step(conn: AsyncConnection) -> int:
            expired = (sa.select(DLV.c.id)
                       .where(DLV.c.region == region, DLV.c.created_at < sa.func.now() - keep,
                              ~sa.exists().where(Q.c.delivery_id == DLV.c.id))
                       .limit(PURGE_BATCH))
            old = (await conn.execute(DLV.delete().where(DLV.c.id.in_(expired.scalar_subquery()))
                                      .returning(DLV.c.id))).scalars().all()
            await conn.execute(ATT.delete().where(ATT.c.region == region,
                                                  ATT.c.delivery_id.in_(old)))
            return len(old)

        return await self.node.db.transaction(step)

    # ------------------------------------------------------------------ recording

    async def flush(self) -> int:
        """Record every finished attempt in one transaction; returns how many."""
        if not self._outcomes:
            return 0
        batch = list(self._outcomes)
        counted = await self.node.db.transaction(lambda conn: self._record(conn, batch))
        del self._outcomes[:len(batch)]
        for outcome, seconds, _ in counted:  # after the commit: a retried step counts once
            self.metrics.attempt(outcome, seconds)
        self._claim_now = True  # slots were freed: something else may be due already
        retries = [retry_in for _, _, retry_in in counted if retry_in is not None]
        if retries:  # look at the queue again when the first of them is due
            due = time.monotonic() + min(retries)
            self._retry_due = due if self._retry_due is None else min(self._retry_due, due)
        return len(batch)

    async def _record(self, conn: AsyncConnection, batch: list[Outcome]
                      ) -> list[tuple[str, float | None, float | None]]:
        """Log each attempt and reschedule or dequeue its delivery. Per attempt: outcome,
        seconds from the event to its delivery (if delivered), seconds to the retry (if
        any)."""
        counted: list[tuple[str, float | None, float | None]] = []
        attempts: list[dict[str, Any]] = []
        done: list[uuid.UUID] = []
        s = self.settings
        now = datetime.now(UTC)
        max_age = timedelta(seconds=s.webhook_max_age_seconds)
        for o in batch:
            job = o.job
            next_at: datetime | None = None
            delay: float | None = None
            final = o.delivered or job.url is None or not job.secrets
            if not final:
                delay = retry_delay(job.attempt, base=s.webhook_retry_base_seconds,
                                    cap=s.webhook_retry_max_interval_seconds)
                next_at = now + timedelta(seconds=delay)
                final = next_at - job.created_at > max_age
            outcome = "delivered" if o.delivered else ("failed" if final else "retrying")
            attempts.append({
                "id": self.node.new_id(self.node.region), "delivery_id": job.delivery_id,
                "endpoint_id": job.endpoint_id, "attempt": job.attempt,
                "attempted_at": now - timedelta(milliseconds=o.duration_ms),
                "status_code": o.status_code, "error": o.error, "duration_ms": o.duration_ms,
                "outcome": outcome, "next_attempt_at": None if final else next_at,
                "region": self.node.region})
            counted.append((outcome, (now - job.created_at).total_seconds()
                            if o.delivered else None, None if final else delay))
            if final:
                done.append(job.delivery_id)
            else:
                await conn.execute(Q.update().where(Q.c.delivery_id == job.delivery_id)
                                   .values(attempts=job.attempt, due_at=next_at,
                                           lease_until=None))
        # One statement each for the whole batch (the worker shares the node's CPU with
        # the payments). A retried flush (commit outcome unknown) finds its attempts
        # already logged.
        await conn.execute(insert(ATT).on_conflict_do_nothing(constraint="uq_webhook_attempt"),
                           attempts)
        if done:
            await conn.execute(Q.delete().where(Q.c.delivery_id.in_(done)))
        return counted
