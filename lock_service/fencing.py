"""The store's side of fencing: refuse a guarded write that carries an older token.

A lock alone cannot stop a holder that was paused (GC, swap, SIGSTOP) past its lease from
writing when it wakes up. The store can: every guarded write carries the lease's `fence`
token, and the store refuses a token older than one it has already accepted for that lock.
Tokens of later holders are strictly greater (proof: `lock_service.quorum`), so once a newer
holder wrote, nothing an older holder sends is accepted any more. The same holder may write
many times with its token: the check is `stored <= token`, not `<`.

The check lives with the data, in the same transaction as the write it guards:

1. A fence column on the guarded row (best when the lock guards rows that have one writer,
   e.g. a region's stock allotment)::

       UPDATE allotments SET units = :units, fence = :token
        WHERE sku = :sku AND region = :region AND fence <= :token
       -- 0 rows: stale token (or no such row) -> roll back

   `fenced_update()` does exactly this with SQLAlchemy Core and tells the two cases apart.

2. A fence register per lock name, checked and advanced first in the transaction
   (`advance_fence()`, or `FencedStore.guarded()` which opens the transaction for you).
   The upsert keeps the register row locked until commit, so guarded transactions of the
   same lock are serialized in token order and each one reads what the previous committed.

Where the store is replicated (PostgreSQL logical replication between regions), keep the
register table region-local (it is not in `replication`'s publication) or key it by region:
two regions inserting the same lock name into a replicated table would stop replication
(`insert_exists`). A write forwarded to the region that owns the rows carries the token, and
that region's store checks it. Set `idle_in_transaction_session_timeout` so a holder paused
inside a transaction cannot keep the register row locked for ever.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    DateTime,
    MetaData,
    Table,
    Text,
    func,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from lock_service.errors import StaleFencingToken
from lock_service.quorum import Lease

FENCE_TABLE = "lock_fences"
"""Default name of the fence register table."""

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _table_name(name: str) -> str:
    # The name is interpolated into SQL, so only plain lower-case identifiers are accepted.
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def fence_table_ddl(table: str = FENCE_TABLE) -> str:
    """CREATE TABLE IF NOT EXISTS statement of a fence register (for a migration)."""
    return (f"create table if not exists {_table_name(table)} ("
            "lock_name text primary key, "
            "fence bigint not null check (fence > 0), "
            "updated_at timestamptz not null default now())")


def fence_table(metadata: MetaData, name: str = FENCE_TABLE) -> Table:
    """The fence register as a SQLAlchemy Table on `metadata` (same shape as the DDL)."""
    return Table(
        _table_name(name), metadata,
        Column("lock_name", Text, primary_key=True),
        Column("fence", BigInteger, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )


async def create_fence_table(conn: AsyncConnection, table: str = FENCE_TABLE) -> None:
    """Create the fence register if it does not exist (tests, tools; use a migration in apps)."""
    await conn.execute(text(fence_table_ddl(table)))


async def advance_fence(conn: AsyncConnection, lock_name: str, token: int, *,
                        table: str = FENCE_TABLE) -> None:
    """Accept `token` for `lock_name` in the caller's transaction, or raise StaleFencingToken.

    Accepted when no token was seen yet or the stored one is <= `token`; the stored one then
    becomes `token`. The register row stays locked until the transaction ends, so call this
    first and do the guarded writes after it in the same transaction.
    """
    name = _table_name(table)
    row = (await conn.execute(text(
        f"insert into {name} (lock_name, fence) values (:lock_name, :token) "
        "on conflict (lock_name) do update set fence = excluded.fence, updated_at = now() "
        f"where {name}.fence <= excluded.fence returning fence"),
        {"lock_name": lock_name, "token": token})).first()
    if row is None:
        current = (await conn.execute(
            text(f"select fence from {name} where lock_name = :lock_name"),
            {"lock_name": lock_name})).scalar()
        raise StaleFencingToken(lock_name, token, current)


async def fenced_update(conn: AsyncConnection, table: Table, where: ColumnElement[bool],
                        values: Mapping[str, Any], token: int, *, lock_name: str = "",
                        fence_column: str = "fence") -> int:
    """UPDATE rows matching `where` with `values` and fence := token, iff their fence <= token.

    Returns the number of rows updated. Raises StaleFencingToken when a matching row exists
    but carries a newer token (the whole statement is then refused: roll back).
    """
    fence = table.c[fence_column]
    result = await conn.execute(
        update(table).where(where, fence <= token).values(**values, **{fence_column: token}))
    updated = int(getattr(result, "rowcount", 0) or 0)
    if updated == 0:
        newest = (await conn.execute(select(func.max(fence)).where(where))).scalar()
        if newest is not None and newest > token:
            raise StaleFencingToken(lock_name or table.name, token, int(newest))
    return updated


class FencedStore:
    """Transactions guarded by a lease: the token is checked before anything is written.

    ::

        store = FencedStore(engine)
        async with locks.hold("sku:42:escrow") as lease:
            async with store.guarded(lease) as conn:   # BEGIN; check + advance the fence
                await conn.execute(...)                # guarded writes
            # COMMIT here; StaleFencingToken (rolled back) if a newer holder wrote first
    """

    def __init__(self, engine: AsyncEngine, *, table: str = FENCE_TABLE) -> None:
        """`engine`: async SQLAlchemy engine (psycopg 3) of the store that owns the data."""
        self.engine = engine
        self.table = _table_name(table)

    async def create_table(self) -> None:
        """Create the fence register if missing."""
        async with self.engine.begin() as conn:
            await create_fence_table(conn, self.table)

    @asynccontextmanager
    async def guarded(self, lease: Lease | str,
                      token: int | None = None) -> AsyncIterator[AsyncConnection]:
        """A transaction that first accepts the token, then yields the connection.

        Pass a `Lease`, or a lock name and a token (a write forwarded from another region
        carries those two).
        """
        if isinstance(lease, Lease):
            lock_name, token = lease.name, lease.fence
        elif token is None:
            raise TypeError("guarded(lock_name, token): the token is missing")
        else:
            lock_name = lease
        async with self.engine.begin() as conn:
            await advance_fence(conn, lock_name, token, table=self.table)
            yield conn

    async def current(self, lock_name: str) -> int | None:
        """The newest token the store has accepted for `lock_name` (None: none yet)."""
        async with self.engine.connect() as conn:
            value = (await conn.execute(
                text(f"select fence from {self.table} where lock_name = :n"),
                {"n": lock_name})).scalar()
        return None if value is None else int(value)
