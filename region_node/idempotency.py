"""Idempotency keys with Stripe's semantics.

- first request with a key: runs; its response is stored with a hash of the request;
- same key, same request: the stored response is replayed (same status, same body);
- same key, different request: 422;
- same key while the first is still running: 409.

SQL is the truth. A key is claimed in its own short transaction (state `started`, with a
fresh token), and the response is recorded in the *same* transaction as the business
effect, so "effect committed" and "response stored" can never disagree. If the node dies
mid-request, the claim stays `started` with nothing committed; after `lock_seconds` a
retry may take it over under a token of its own.

Exactly one executor commits. The effect transaction starts by locking the key row and
checking that it is still `started` under its own token (`hold`), and `finish` updates
only that row: a stalled original whose claim was taken over finds another token and
rolls back (`ClaimLost`, answered with the winner's stored response or a 409), and a
retry that arrives while the original's effect transaction runs finds the key row locked
and answers 409 at once (`NOWAIT`) instead of racing it.

Keys are scoped by the caller (the principal) and by the home region whose owner stores
them: another tenant's identical key string is a different key.
Redis only caches finished responses: losing it costs a SQL read, nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema
from region_node.db import Database, sqlstate
from region_node.errors import (
    IdempotencyInProgress,
    IdempotencyMismatch,
    InvalidRequest,
    RegionUnavailable,
)
from region_node.ownership import assert_serving
from region_node.redact import scrub

K = schema.idempotency_keys
log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class StoredResponse:
    """A response to replay."""

    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Claim:
    """A key this request claimed: only the holder of `token` may finish it."""

    scope: str
    key: str
    token: uuid.UUID


class ClaimLost(IdempotencyInProgress):
    """Our claim was taken over by a retry (we stalled past the lock time): the effect
    must not commit. `stored` is the winner's response if it has finished."""

    def __init__(self, stored: StoredResponse | None) -> None:
        super().__init__(_IN_PROGRESS)
        self.stored = stored


def request_hash(method: str, path: str, body: bytes) -> str:
    """Hash of what the client asked for: method, path and the JSON body in canonical form
    (key order and whitespace do not make two requests different)."""
    try:
        canonical = json.dumps(json.loads(body or b"null"), sort_keys=True, separators=(",", ":"))
    except ValueError:
        canonical = body.decode("utf-8", "replace")
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def validate_key(key: str) -> str:
    """Reject empty or oversized keys with a 400."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters",
            code="invalid_idempotency_key", param="Idempotency-Key")
    return key


def caller_key(principal_id: uuid.UUID | None, key: str) -> str:
    """The stored key of a client's key: its caller's principal id and `storage_key`.

    Stripe scopes keys per account: two tenants who happen to pick the same key string
    never see each other's stored response, nor a 422 for each other's requests."""
    stored = storage_key(key)
    return stored if principal_id is None else f"{principal_id}/{stored}"


def storage_key(key: str) -> str:
    """The form a client's key is stored in (SQL and Redis).

    Keys are the client's choice, and some put a card number or an API key in them. Such a
    key is stored as its SHA-256: the same key always maps to the same stored form, so the
    semantics do not change, and the raw value is never written anywhere. Other keys are
    stored as sent (readable when debugging)."""
    if scrub(key) == key:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class IdempotencyStore:
    """Claims, finishes and replays idempotency keys for one region."""

    def __init__(self, db: Database, redis: Redis | None, *, ttl_seconds: float,
                 lock_seconds: float, region: str | None = None) -> None:
        self.db = db
        # With a region, every write of a key row is fenced like the business write: only
        # the region serving the key's scope (home region), under an epoch without a ban,
        # may insert, update or delete it (ownership.assert_serving). Two regions never
        # write the same key row, and a claim left `started` by an earlier epoch's owner
        # (its request was refused by the handover's ban) is dead: a retry takes it over.
        self.region = region
        self.redis = redis
        self.ttl = timedelta(seconds=ttl_seconds)
        self.lock = timedelta(seconds=lock_seconds)

    @staticmethod
    def _cache_key(scope: str, key: str) -> str:
        return f"idem:{scope}:{key}"

    async def _cached(self, scope: str, key: str) -> dict[str, Any] | None:
        if self.redis is None:
            return None
        try:
            raw = await self.redis.get(self._cache_key(scope, key))
        except Exception as exc:  # Redis is only a fast path; SQL answers instead.
            log.debug("idempotency cache read failed: %s", exc)
            return None
        return json.loads(raw) if raw else None

    async def claim(self, scope: str, key: str, req_hash: str) -> StoredResponse | Claim:
        """Claim the key for this request, or return the response to replay.

        Raises IdempotencyMismatch (422) or IdempotencyInProgress (409).
        """
        cached = await self._cached(scope, key)
        if cached is not None:
            if cached["hash"] != req_hash:
                raise IdempotencyMismatch(_MISMATCH)
            return StoredResponse(cached["status"], cached["body"])
        return await self.db.transaction(lambda conn: self._claim_sql(conn, scope, key, req_hash))

    async def _claim_sql(self, conn: AsyncConnection, scope: str, key: str,
                         req_hash: str) -> StoredResponse | Claim:
        now = datetime.now(UTC)
        mine = Claim(scope, key, uuid.uuid4())
        # The claim needs no flush of its own: the effect's commit, synchronous, flushes
        # the WAL up to and including it; a claim lost in a crash had no effect to guard.
        await conn.execute(sa.text("set local synchronous_commit = off"))
        epoch = await self._fence(conn, scope)
        inserted = (await conn.execute(
            pg_insert(K).values(scope=scope, key=key, request_hash=req_hash, state="started",
                                locked_at=now, expires_at=now + self.ttl, epoch=epoch,
                                token=mine.token)
            .on_conflict_do_nothing().returning(K.c.key))).first()
        if inserted is not None:
            return mine
        try:
            # A locked row means an effect transaction holding it is running right now
            # (`hold`): that request is alive, so this one is a concurrent duplicate.
            row = (await conn.execute(sa.select(K).where(K.c.scope == scope, K.c.key == key)
                                      .with_for_update(nowait=True))).one()
        except DBAPIError as exc:
            if sqlstate(exc) == _LOCK_NOT_AVAILABLE:
                raise IdempotencyInProgress(_IN_PROGRESS) from None
            raise
        if row.expires_at <= now:
            # An expired key is forgotten: the same key starts a new request.
            await conn.execute(K.update().where(K.c.scope == scope, K.c.key == key).values(
                request_hash=req_hash, state="started", locked_at=now, response_status=None,
                response_body=None, created_at=now, expires_at=now + self.ttl, epoch=epoch,
                token=mine.token))
            return mine
        if row.request_hash != req_hash:
            raise IdempotencyMismatch(_MISMATCH)
        if row.state == "finished":
            return StoredResponse(row.response_status, row.response_body)
        earlier_epoch = epoch is not None and row.epoch is not None and row.epoch != epoch
        if row.locked_at is not None and row.locked_at > now - self.lock and not earlier_epoch:
            raise IdempotencyInProgress(_IN_PROGRESS)
        # The first attempt has not reached (or died before) its effect transaction: this
        # retry takes over under a new token, and the original can no longer finish.
        await conn.execute(K.update().where(K.c.scope == scope, K.c.key == key)
                           .values(locked_at=now, epoch=epoch, token=mine.token))
        return mine

    async def hold(self, conn: AsyncConnection, claim: Claim) -> None:
        """First statement of the effect transaction: lock the key row and check that it
        is still ours and unfinished, else ClaimLost (the transaction must roll back).
        The lock makes a takeover wait for (and then see) our outcome."""
        row = (await conn.execute(sa.select(K).where(K.c.scope == claim.scope,
                                                     K.c.key == claim.key)
                                  .with_for_update())).one_or_none()
        if row is not None and row.state == "started" and row.token == claim.token:
            return
        stored = (StoredResponse(row.response_status, row.response_body)
                  if row is not None and row.state == "finished" else None)
        raise ClaimLost(stored)

    async def _fence(self, conn: AsyncConnection, scope: str) -> int | None:
        """The ownership check before a key row write; the epoch (None: not fenced)."""
        if self.region is None:
            return None
        return await assert_serving(conn, self.region, scope)

    async def finish(self, conn: AsyncConnection, claim: Claim, status: int,
                     body: dict[str, Any]) -> None:
        """Record the response in the caller's transaction (the one with the effect); only
        while the claim is still ours (else ClaimLost, and the transaction rolls back)."""
        done = await conn.execute(
            K.update().where(K.c.scope == claim.scope, K.c.key == claim.key,
                             K.c.state == "started", K.c.token == claim.token)
            .values(state="finished", response_status=status, response_body=body,
                    locked_at=None))
        if done.rowcount != 1:
            raise ClaimLost(None)

    async def finish_alone(self, claim: Claim, status: int, body: dict[str, Any]) -> None:
        """Record a response that had no effect to commit with (a 4xx decision); nothing
        if the claim was taken over meanwhile (the winner's answer stands)."""
        async def step(conn: AsyncConnection) -> None:
            await self._fence(conn, claim.scope)
            await self.finish(conn, claim, status, body)
        with contextlib.suppress(ClaimLost):
            await self.db.transaction(step)

    async def release(self, claim: Claim) -> None:
        """Forget a claim whose request failed without an answer (5xx): a retry may run it.
        Only our own claim: a takeover's is left alone."""
        async def step(conn: AsyncConnection) -> None:
            await self._fence(conn, claim.scope)
            await conn.execute(K.delete().where(K.c.scope == claim.scope, K.c.key == claim.key,
                                                K.c.state == "started",
                                                K.c.token == claim.token))
        with contextlib.suppress(Exception):
            await self.db.transaction(step)

    async def remember(self, scope: str, key: str, req_hash: str, status: int,
                       body: dict[str, Any]) -> None:
        """Cache a finished response in Redis until the key expires (best effort)."""
        if self.redis is None:
            return
        payload = json.dumps({"hash": req_hash, "status": status, "body": body})
        try:
            await self.redis.set(self._cache_key(scope, key), payload,
                                 ex=int(self.ttl.total_seconds()))
        except Exception as exc:
            log.debug("idempotency cache write failed: %s", exc)

    async def purge_expired(self, scopes: list[str], limit: int = 1000) -> int:
        """Delete expired keys of the home regions we serve (`scopes`); returns how many.

        Never another region's keys: a delete of a row that region inserted would be a
        replication conflict (delete_origin_differs) there.
        """
        def step_for(scope: str) -> Callable[[AsyncConnection], Awaitable[int]]:
            async def step(conn: AsyncConnection) -> int:
                await self._fence(conn, scope)
                doomed = (sa.select(K.c.scope, K.c.key)
                          .where(K.c.scope == scope, K.c.expires_at <= sa.func.now())
                          .limit(limit).with_for_update(skip_locked=True))
                result = await conn.execute(K.delete().where(
                    sa.tuple_(K.c.scope, K.c.key).in_(doomed)))
                return int(result.rowcount or 0)
            return step

        purged = 0
        for scope in scopes:
            try:
                purged += await self.db.transaction(step_for(scope))
            except RegionUnavailable:
                continue  # not (or no longer) ours: its owner purges it
        return purged


_LOCK_NOT_AVAILABLE = "55P03"
_IN_PROGRESS = "A request with this Idempotency-Key is still being processed; retry later"
_MISMATCH = ("Keys for idempotent requests can only be used with the same parameters they "
             "were first used with")
