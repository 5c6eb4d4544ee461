"""Runs a mutating request as one transaction, with Idempotency-Key handling around it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node.api.audit_trail import mark_audited, record_in
from region_node.errors import IdempotencyInProgress, IdempotencyMismatch, PaymentError
from region_node.idempotency import (
    Claim,
    ClaimLost,
    StoredResponse,
    caller_key,
    request_hash,
    validate_key,
)
from region_node.node import Node
from region_node.ownership import assert_serving

Result = tuple[int, dict[str, Any]]
Step = Callable[[AsyncConnection], Awaitable[Result]]
AfterCommit = Callable[[dict[str, Any]], None]


def node_of(request: Request) -> Node:
    """The Node this app serves."""
    node: Node = request.app.state.node
    return node


async def run_mutation(request: Request, step: Step, *, home: str | None,
                       after_commit: AfterCommit | None = None,
                       unrecorded: tuple[type[PaymentError], ...] = (),
                       claim: Claim | None = None) -> JSONResponse:
    """Run `step` in a transaction and answer with its (status, body).

    The transaction first checks, under lock, that this region still serves `home` (the
    ownership fence: a region that lost ownership can no longer write). With an
    Idempotency-Key the response is stored in the same transaction as the effect, keyed
    by the home region; a replay answers the stored response with header
    `Idempotent-Replayed: true`. `after_commit` sees the body of a fresh (not replayed)
    success. Keys are the caller's own (`idempotency.caller_key`), and only the executor
    holding the key's claim commits (`IdempotencyStore.hold`). Errors in `unrecorded` are
    not the key's final answer (the caller may fix the cause and run the request again,
    e.g. after moving stock): the claim is released. `claim`: the key was claimed
    already (the payment hot path's committed claim, api/payments.py): run the effect
    under it.
    """
    node = node_of(request)
    home = home or node.region

    async def fenced(conn: AsyncConnection,
                     before: Callable[[], Awaitable[None]] | None = None) -> Result:
        await assert_serving(conn, node.region, home)
        if before is not None:
            await before()
        status, body = await step(conn)
        # The audit row commits (or not) with the effect itself (api/audit_trail.py).
        await record_in(conn, request, status, body)
        return status, body

    key = request.headers.get("idempotency-key")
    if key is None:
        status, body = await node.db.transaction(fenced)
        mark_audited(request)
        if after_commit is not None:
            after_commit(body)
        return JSONResponse(body, status)

    principal = getattr(request.state, "principal", None)
    key = caller_key(principal.id if principal is not None else None, validate_key(key))
    scope = home
    req_hash = request_hash(request.method, request.url.path, await request.body())
    if claim is None:
        claimed = await node.idempotency.claim(scope, key, req_hash)
        if isinstance(claimed, StoredResponse):
            return _replay(claimed)
        claim = claimed
    held = claim

    async def step_and_record(conn: AsyncConnection) -> Result:
        status, body = await fenced(conn, before=lambda: node.idempotency.hold(conn, held))
        await node.idempotency.finish(conn, held, status, body)
        return status, body

    try:
        status, body = await node.db.transaction(step_and_record)
    except ClaimLost as lost:
        # A retry took our stalled claim over: its outcome is the key's answer, not ours.
        if lost.stored is not None:
            return _replay(lost.stored)
        raise
    except (IdempotencyInProgress, IdempotencyMismatch):
        raise
    except unrecorded:
        await node.idempotency.release(claim)
        raise
    except PaymentError as exc:
        if exc.http_status < 500:
            # A decision (402, 404, 409...) is an answer too: replay it on retry.
            await node.idempotency.finish_alone(claim, exc.http_status, exc.to_body())
            await node.idempotency.remember(scope, key, req_hash, exc.http_status, exc.to_body())
        else:
            await node.idempotency.release(claim)
        raise
    except BaseException:
        await node.idempotency.release(claim)
        raise
    mark_audited(request)
    await node.idempotency.remember(scope, key, req_hash, status, body)
    if after_commit is not None:
        after_commit(body)
    return JSONResponse(body, status)


def _replay(stored: StoredResponse) -> JSONResponse:
    return JSONResponse(stored.body, stored.status, headers={"Idempotent-Replayed": "true"})
