"""The payment hot path: an automatic, same-region payment in one SQL round trip.

`POST /v1/payments` with capture_method=automatic and payer and payee in the same home
region (the common case) is one call of the SQL function `pay_local` (migration 0013):
ownership fence, Idempotency-Key claim, access check, account locks, checks, posting,
payment, outbox and audit rows and the stored response, in one implicit transaction
(autocommit: no BEGIN / COMMIT round trips), as a prepared statement (no SQLAlchemy
compilation). It keeps every guarantee of the general path (api/mutation.run_mutation
around payments.create_payment), which it mirrors step for step:

- the ownership lease is checked here, just before the call, by the registered write
  guard (`ownership.guard_for`), and its token is handed to the function, which refuses
  unless it is the store's current epoch; the lease's remaining time bounds the
  transaction (`transaction_timeout`), so a paused node cannot commit after its lease;
- the key is claimed and finished in the same transaction as the effect: no second
  executor can commit (a concurrent duplicate waits for the row and replays, or gets
  409 when a claim of the two-transaction path holds the key);
- a domain error (402, 404...) commits only the claim; it is recorded as the key's answer
  here, as run_mutation does (`IdempotencyStore.finish_alone`).

Anything the function cannot finish quickly falls back to the general path: a row lock
not granted within `hot_path_lock_timeout_ms` (a hot account, a duplicate in flight)
rolls the call back (SQLSTATE 55P03), and the request runs again as two transactions,
whose committed claim is what a concurrent duplicate must see to answer 409 at once.

Not here: Redis. The SQL row is the truth for replays and one call answers them anyway;
a Redis read and write per payment cost more node CPU than they save.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from region_node import ownership
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
    "%s::uuid, %s::uuid[], %s::uuid, %s::uuid, %s::uuid, %s::text, %s::text, %s::text)")

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
    """The answer of pay_local: `kind` ok, replay or error; `token` set when an error's
    key claim committed (the caller records the error as the key's answer)."""

    kind: str
    status: int
    body: dict[str, Any] | None
    token: uuid.UUID | None
    error: PaymentError | None


class Fallback(Exception):
    """The call was rolled back before anything committed (a lock not granted in time, a
    serialization failure): run the request on the general path."""


class HotPath:
    """A region node's pool of autocommit connections for `pay_local`."""

    def __init__(self, database_url: str, *, region: str, size: int, lock_timeout_ms: int,
                 ttl_seconds: float, lock_seconds: float) -> None:
        url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.region = region
        self.ttl_seconds = ttl_seconds
        self.lock_seconds = lock_seconds
        self.pool = AsyncConnectionPool(
            url, min_size=1, max_size=size, open=False, timeout=5,
            kwargs={"autocommit": True, "prepare_threshold": 0,
                    # A payment that cannot get a row lock soon falls back (module doc).
                    "options": f"-c lock_timeout={lock_timeout_ms}"})
        self._opened = False

    async def _open(self) -> None:
        if not self._opened:
            self._opened = True
            await self.pool.open(wait=False)

    async def close(self) -> None:
        """Close the pool."""
        if self._opened:
            await self.pool.close()

    async def pay(self, payment: Payment, caller: Caller) -> Outcome:
        """Run one payment; raises Fallback (nothing committed: use the general path) or
        RegionUnavailable (the store is unreachable, or the lease ended the write)."""
        await self._open()
        lease_error: RegionUnavailable | None = None
        budget: int | None = None
        token: int | None = None
        guard = ownership.guard_for(self.region)
        if guard is not None:
            # The lease, as assert_serving checks it, but before the call: the function
            # refuses unless `token` is the store's current epoch. An invalid lease is
            # answered after the ownership checks (the general path's order of errors).
            budget = guard.budget_ms(payment.home)
            token = guard.token(payment.home)
            try:
                guard.check(payment.home, token if token is not None else -1)
            except RegionUnavailable as exc:
                lease_error, token = exc, -1
        params = (
            self.region, payment.home, ownership.LOCK_CLASS, budget, token,
            caller.principal_id, caller.admin,
            payment.home, caller.key, caller.request_hash, self.ttl_seconds, self.lock_seconds,
            payment.payment_id, payment.payer, payment.payee, payment.amount, payment.currency,
            payment.description,
            new_id(), [new_id(), new_id()], new_id(),
            caller.audit_id, caller.key_id, scrub(caller.action)[:200],
            scrub(str(payment.payment_id))[:200],
            caller.request_id[:128] if caller.request_id else None)
        try:
            async with self.pool.connection() as conn:
                row = await (await conn.execute(PAY_LOCAL, params, prepare=True)).fetchone()
        except PoolTimeout:
            # Every hot-path connection busy for the pool's timeout (a queue on one hot
            # account): nothing was sent; the general path has a pool of its own.
            raise Fallback("pool") from None
        except psycopg.Error as exc:
            raise _database_error(exc) from exc
        assert row is not None
        kind, status, body, claim_token, code, message, param = row
        if kind != "error":
            return Outcome(kind, status, body, None, None)
        if code == "lease_lost" and lease_error is not None:
            error: PaymentError = lease_error
        else:
            error = _ERRORS[status](message, code=code, param=param)
        return Outcome(kind, status, None, claim_token, error)


def _database_error(exc: psycopg.Error) -> Exception:
    """What a failed call means for the request (nothing of it committed)."""
    state = exc.sqlstate
    if state == LOCK_NOT_AVAILABLE or state in RETRYABLE_SQLSTATES:
        return Fallback(state)
    if state == TRANSACTION_TIMEOUT:
        return RegionUnavailable("the write would have outlived this region's ownership lease; "
                                 "retry", code="lease_lost")
    if state in SESSION_ENDED_SQLSTATES:
        return RegionUnavailable("the region's database ended this write (an ownership lease "
                                 "ran out, or a shutdown); retry")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and state is None:
        log.warning("payment hot path: the database is unavailable: %r", exc)
        return RegionUnavailable("the region's database is unavailable")
    return exc
