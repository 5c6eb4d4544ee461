"""The region's SQL store: an async SQLAlchemy engine over psycopg 3, and the one helper
that runs a business step in a transaction and retries it on serialization failures."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from region_node import write_guard
from region_node.errors import RegionUnavailable
from region_node.wakeups import Wakeups, take_marks

T = TypeVar("T")

# 40001 serialization_failure, 40P01 deadlock_detected: the step is safe to run again.
RETRYABLE_SQLSTATES = {"40001", "40P01"}
TRANSACTION_TIMEOUT = "25P04"
# Class 57, operator intervention: the server ended the session (57P01 admin_shutdown is
# also what the ownership lease's fence sends to writers still running when the lease
# runs out, `region_node.leases`: `write_guard.ended_session_error` tells the two apart).
# Nothing of the step committed; the client retries.
SESSION_ENDED_SQLSTATES = {"57P01", "57P02", "57P03"}


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, if it carries one."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None)


def constraint_name(exc: BaseException) -> str | None:
    """Name of the constraint a database error violated, if any."""
    orig = getattr(exc, "orig", None)
    diag = getattr(orig, "diag", None)
    return getattr(diag, "constraint_name", None)


class Database:
    """Connection pool of one region's PostgreSQL."""

    def __init__(self, url: str, *, pool_size: int = 20, max_overflow: int = 10,
                 retry_attempts: int = 8, region: str | None = None) -> None:
        self.region = region
        """The region whose write guard answers for a session the server ended."""
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        # No pre-ping (a round trip per transaction): a connection found dead fails its
        # step with 503, SQLAlchemy then drops the whole pool, and the client's retry
        # (same Idempotency-Key) runs on fresh connections.
        self.engine: AsyncEngine = create_async_engine(
            url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=10)
        self.reads: AsyncEngine = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        """The same pool in autocommit, for the background workers' one-statement reads
        and upserts: the statement alone, without the BEGIN and the ROLLBACK (or COMMIT)
        round trips a transaction puts around it. An idle node's workers make dozens of
        such statements a second, so this halves its round trips. Not for anything that
        must see or write several statements atomically: that is `transaction`."""
        self.retry_attempts = retry_attempts
        self.wakeups = Wakeups()
        """The node's worker wake-ups: what a committed transaction `mark`ed is signalled."""

    async def transaction(self, step: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run `step` in one transaction; rerun it on 40001/40P01 with jittered backoff.

        A lost connection becomes RegionUnavailable (503): the step's transaction did not
        commit, or if it did the client's retry with the same Idempotency-Key is safe.
        """
        delay = 0.005
        for attempt in range(self.retry_attempts):
            try:
                async with self.engine.begin() as conn:
                    take_marks(conn)  # a rolled-back earlier user's marks are not ours
                    result = await step(conn)
                    marked = take_marks(conn)
                if marked:
                    self.wakeups.signal(*marked)  # committed: the workers find the rows
                return result
            except DBAPIError as exc:
                if sqlstate(exc) in RETRYABLE_SQLSTATES and attempt + 1 < self.retry_attempts:
                    await asyncio.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 0.5)
                    continue
                if sqlstate(exc) == TRANSACTION_TIMEOUT:
                    # Bounded by the ownership lease (ownership.assert_serving): nothing
                    # committed, the session is gone; the client retries.
                    raise RegionUnavailable("the write would have outlived this region's "
                                            "ownership lease; retry",
                                            code="lease_lost") from exc
                if sqlstate(exc) in SESSION_ENDED_SQLSTATES:
                    raise write_guard.ended_session_error(self.region) from exc
                if isinstance(exc, OperationalError | InterfaceError) and sqlstate(exc) is None:
                    raise RegionUnavailable("the region's database is unavailable") from exc
                raise
        raise AssertionError("unreachable")

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()
