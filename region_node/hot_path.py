"""The payment hot path: an automatic, same-region payment in one SQL round trip.

`POST /v1/payments` with capture_method=automatic and payer and payee in the same home
region (the common case) is one call of the SQL function `pay_local` (migration 0013):
ownership fence, Idempotency-Key claim, access check, account locks, checks, posting,
payment, outbox and audit rows and the stored response, in one implicit transaction
(autocommit: no BEGIN / COMMIT round trips), as a prepared statement (no SQLAlchemy
compilation). It keeps every guarantee of the general path (api/mutation.run_mutation
around payments.create_payment), which it mirrors step for step:

- the ownership lease is checked here, just before the call, by the registered write
  guard (`write_guard.guard_for`), and its token is handed to the function, which refuses
  unless it is the store's current epoch; the lease's remaining time bounds the
  transaction (`transaction_timeout`), so a paused node cannot commit after its lease;
- the key is claimed and finished in the same transaction as the effect: no second
  executor can commit (a concurrent duplicate waits for the row and replays, or gets
  409 when a claim of the two-transaction path holds the key);
- a domain error (402, 404...) commits only the claim; it is recorded as the key's answer
  here, as run_mutation does (`IdempotencyStore.finish_alone`).

Anything the function cannot finish quickly goes to the general path. An account locked
elsewhere for longer than `hot_path_lock_timeout_ms` answers 'busy': the key's claim
commits (as the general path's claim transaction would) and the effect runs on the
general path under that claim, so a duplicate arriving meanwhile sees a committed claim
and gets 409 at once. Any other lock not granted in time (a duplicate's uncommitted
claim), a deadlock or a lost connection rolls the call back, and the request runs again
as two transactions.

Not here: Redis. The SQL row is the truth for replays and one call answers them anyway;
a Redis read and write per payment cost more node CPU than they save.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from region_node import ownership, wakeups, write_guard
from region_node.db import RETRYABLE_SQLSTATES, SESSION_ENDED_SQLSTATES, TRANSACTION_TIMEOUT
from region_node.errors import (
    Forbidden,
    IdempotencyInProgress,
    IdempotencyMismatch,
    InsufficientFunds,
    InvalidRequest,
    NotFound,
    PaymentError,
    RegionUnavailable,
)
from region_node.ids import new_id
from region_node.redact import scrub

log = logging.getLogger(__name__)

# One statement, prepared once per connection (prepare_threshold=0). The casts pin the
# function's signature, so psycopg's parameter types never pick another overload.
PAY_LOCAL = (
    "select kind, status, body, token, code, message, param from pay_local("
    "%s::text, %s::text, %s::integer, %s::integer, %s::bigint, %s::uuid, %s::boolean, "
    "%s::text, %s::text, %s::text, %s::float8, %s::float8, "
    "%s::uuid, %s::uuid, %s::uuid, %s::bigint, %s::text, %s::text, "
    "%s::uuid, %b::uuid[], %s::uuid, %s::uuid, %s::uuid, %s::text, %s::text, %s::text)")

# Group commit: the payments of a batch, one array per parameter (migration 0014).
# Arrays go in binary (%b): psycopg quotes a text array element by element with a regex,
# ~100 us for 30 strings against ~6 us packed (a batch passes twenty-one arrays).
PAY_BATCH = (
    "select idx, kind, status, body, token, code, message, param from pay_batch("
    "%s::text, %s::integer, %s::integer, %b::text[], %b::bigint[], %b::uuid[], "
    "%b::boolean[], %b::text[], %b::text[], %s::float8, %s::float8, "
    "%b::uuid[], %b::uuid[], %b::uuid[], %b::bigint[], %b::text[], %b::text[], "
    "%b::uuid[], %b::uuid[], %b::uuid[], %b::uuid[], %b::uuid[], %b::uuid[], %b::text[], "
    "%b::text[], %b::text[])")

LOCK_NOT_AVAILABLE = "55P03"

# The domain error each refusal of pay_local maps to, by HTTP status (codes ride along).
_ERRORS: dict[int, type[PaymentError]] = {
    400: InvalidRequest, 402: InsufficientFunds, 403: Forbidden, 404: NotFound,
    409: IdempotencyInProgress, 422: IdempotencyMismatch, 503: RegionUnavailable,
}


@dataclass(frozen=True)
class Payment:
    """What the route knows of a new payment before the call."""

    payment_id: uuid.UUID
    payer: uuid.UUID
    payee: uuid.UUID
    home: str
    amount: int
    currency: str
    description: str | None


@dataclass(frozen=True)
class Caller:
    """Who asks, and the Idempotency-Key (already scoped to the caller) with its hash."""

    principal_id: uuid.UUID | None
    key_id: uuid.UUID | None
    admin: bool
    key: str | None
    request_hash: str | None
    request_id: str | None
    action: str
    audit_id: uuid.UUID


@dataclass(frozen=True)
class Outcome:
    """The answer of pay_local: `kind` ok, replay, error or busy; `token` set when the
    key's claim committed without an answer: an error's (the caller records the error as
    the key's answer), or a busy payment's (the caller runs the effect on the general path
    under that claim)."""

    kind: str
    status: int
    body: dict[str, Any] | None
    token: uuid.UUID | None
    error: PaymentError | None


class Fallback(Exception):
    """The call was rolled back before anything committed (a lock not granted in time, a
    serialization failure): run the request on the general path."""


@dataclass
class _Item:
    """A payment waiting for (or in) a batch, and the future its request awaits."""

    payment: Payment
    caller: Caller
    done: asyncio.Future[Outcome]
    lease_error: RegionUnavailable | None = None

    def params(self, token: int | None) -> tuple[Any, ...]:
        """Its part of pay_local's or pay_batch's parameters, from p_homes on (ids made
        here: journal, its two entries, the outbox event)."""
        p, c = self.payment, self.caller
        return (p.home, token, c.principal_id, c.admin, c.key, c.request_hash,
                p.payment_id, p.payer, p.payee, p.amount, p.currency, p.description,
                new_id(), new_id(), new_id(), new_id(),
                c.audit_id, c.key_id, scrub(c.action)[:200], scrub(str(p.payment_id))[:200],
                c.request_id[:128] if c.request_id else None)


class HotPath:
    """A region node's payment hot path: a queue of payments, and `executors` tasks that
    each take every payment queued so far and run them as one call (group commit).

    No payment waits for a batch to fill: an idle executor takes a payment at once (alone:
    one pay_local call); under load, the payments that arrive while the executors are
    busy (their previous batch in the database, waiting for its commit's flush) form the
    next batch, up to `batch_max` (one pay_batch call, one commit). The batch size
    follows the load, like a database's group commit.
    """

    def __init__(self, database_url: str, *, region: str, executors: int, batch_max: int,
                 lock_timeout_ms: int, ttl_seconds: float, lock_seconds: float) -> None:
        url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.region = region
        self.wakeups: wakeups.Wakeups | None = None
        """The node's worker wake-ups (set by `Node.connect`): a batch wakes the relay."""
        self.ttl_seconds = ttl_seconds
        self.lock_seconds = lock_seconds
        self.executors = executors
        self.batch_max = batch_max
        self.pool = AsyncConnectionPool(
            url, min_size=1, max_size=executors, open=False, timeout=5,
            kwargs={"autocommit": True, "prepare_threshold": 0,
                    # A payment that cannot get a row lock soon falls back (module doc).
                    "options": f"-c lock_timeout={lock_timeout_ms}"})
        self._queue: list[_Item] = []
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Payments and batches run, for the metrics and the benchmark's report.
        self.payments = 0
        self.batches = 0

    async def start(self) -> None:
        """Open the pool (connecting in the background) and start the executors; at the
        node's start, so the first payment does not wait for a connection."""
        if not self._tasks:
            await self.pool.open(wait=False)
            self._start()

    def _start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._execute_loop(), name="hot-path-executor")
                           for _ in range(self.executors)]

    async def close(self) -> None:
        """Stop the executors (payments still queued fall back) and close the pool."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for item in self._queue:
            if not item.done.done():
                item.done.set_exception(Fallback("closing"))
        self._queue.clear()
        if self._tasks:
            self._tasks = []
            await self.pool.close()

    async def pay(self, payment: Payment, caller: Caller) -> Outcome:
        """Run one payment (in the next batch); raises Fallback (nothing of it committed:
        use the general path) or RegionUnavailable (the store is unreachable, or the
        lease ended the write)."""
        await self.start()
        item = _Item(payment, caller, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._ready.set()
        return await item.done

    async def _execute_loop(self) -> None:
        while True:
            await self._ready.wait()
            batch = self._queue[:self.batch_max]
            del self._queue[:len(batch)]
            if not self._queue:
                self._ready.clear()
            if not batch:
                continue
            try:
                await self._execute(batch)
            except BaseException as exc:
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(
                            exc if isinstance(exc, Exception) else Fallback("stopped"))
                if not isinstance(exc, Exception):
                    raise

    def _fence(self, batch: list[_Item]) -> tuple[int | None, list[int | None]]:
        """The lease, as assert_serving checks it, but before the call: the function
        refuses a payment unless its token is the store's current epoch. An invalid lease
        is answered after the ownership checks (the general path's order of errors).
        Returns the transaction's budget (the shortest of its homes') and the tokens."""
        guard = write_guard.guard_for(self.region)
        if guard is None:
            return None, [None] * len(batch)
        budgets: dict[str, int | None] = {}
        tokens: list[int | None] = []
        for item in batch:
            home = item.payment.home
            if home not in budgets:
                budgets[home] = guard.budget_ms(home)
            token = guard.token(home)
            try:
                guard.check(home, token if token is not None else -1)
            except RegionUnavailable as exc:
                item.lease_error, token = exc, -1
            tokens.append(token)
        valid = [b for b in budgets.values() if b is not None]
        return (min(valid) if valid else None), tokens

    async def _execute(self, batch: list[_Item]) -> None:
        budget, tokens = self._fence(batch)
        params = [item.params(token) for item, token in zip(batch, tokens, strict=True)]
        try:
            async with self.pool.connection() as conn:
                if len(batch) == 1:
                    # Alone: no subtransaction needed (a failure rolls back only it).
                    (home, token, principal, admin, key, req_hash, pid, payer, payee, amount,
                     currency, description, journal, debit, credit, event, audit_id, key_id,
                     action, resource, request_id) = params[0]
                    cur = await conn.execute(PAY_LOCAL, (
                        self.region, home, ownership.LOCK_CLASS, budget, token, principal,
                        admin, home, key, req_hash, self.ttl_seconds, self.lock_seconds, pid,
                        payer, payee, amount, currency, description, journal, [debit, credit],
                        event, audit_id, key_id, action, resource, request_id), prepare=True)
                    rows = [(1, *row) for row in await cur.fetchall()]
                else:
                    columns = [list(col) for col in zip(*params, strict=True)]
                    cur = await conn.execute(PAY_BATCH, (
                        self.region, ownership.LOCK_CLASS, budget, *columns[:6],
                        self.ttl_seconds, self.lock_seconds, *columns[6:]), prepare=True)
                    rows = list(await cur.fetchall())
        except PoolTimeout:
            raise Fallback("pool") from None
        except psycopg.Error as exc:
            failed = _database_error(exc, self.region)
            if isinstance(failed, RegionUnavailable) and exc.sqlstate is None:
                # The connection was lost (a pooled connection whose backend was ended
                # while idle, or a failure mid-call): whether the call committed is
                # unknown. A payment with an Idempotency-Key is safe to run again on the
                # general path (it replays what committed); one without stays a 503.
                keyed = [item for item in batch if item.caller.key is not None]
                for item in keyed:
                    item.done.set_exception(Fallback("connection lost"))
            raise failed from exc
        self.batches += 1
        if self.wakeups is not None and any(row[1] not in ("busy", "fallback", "error")
                                            for row in rows):
            self.wakeups.signal(wakeups.OUTBOX)  # committed: the relay and the fan-out
        self.payments += len(batch)
        for idx, kind, status, body, claim_token, code, message, param in rows:
            item = batch[idx - 1]
            if kind == "busy":
                item.done.set_result(Outcome(kind, 0, None, claim_token, None))
            elif kind == "fallback":
                log.info("payment hot path: %s rolled back alone (%s: %s); general path",
                         item.payment.payment_id, code, message)
                item.done.set_exception(Fallback(code))
            elif kind != "error":
                item.done.set_result(Outcome(kind, status, body, None, None))
            else:
                error: PaymentError
                if code == "lease_lost" and item.lease_error is not None:
                    error = item.lease_error
                else:
                    error = _ERRORS[status](message, code=code, param=param)
                item.done.set_result(Outcome(kind, status, None, claim_token, error))


def _database_error(exc: psycopg.Error, region: str) -> Exception:
    """What a failed call means for the request (nothing of it committed)."""
    state = exc.sqlstate
    if state == LOCK_NOT_AVAILABLE or state in RETRYABLE_SQLSTATES:
        return Fallback(state)
    if state == TRANSACTION_TIMEOUT:
        return RegionUnavailable("the write would have outlived this region's ownership lease; "
                                 "retry", code="lease_lost")
    if state in SESSION_ENDED_SQLSTATES:
        return write_guard.ended_session_error(region)
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and state is None:
        log.warning("payment hot path: the database is unavailable: %r", exc)
        return RegionUnavailable("the region's database is unavailable")
    return exc
