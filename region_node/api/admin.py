"""Admin API: principals, their API keys, and the audit trail. Admins only (every path
here is under /v1/admin/, see api/auth.py).

A principal and its keys are written by the region that serves the principal's home
region (stamped into its id), through the same fenced transaction as every other write;
another region forwards the request there. Routes that answer with a new key refuse an
Idempotency-Key: a stored response would keep the key in clear (and replicate it).
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import audit, principals
from region_node.api.auth import caller
from region_node.api.models import CreatePrincipal
from region_node.api.mutation import Result, node_of, run_mutation
from region_node.api.routing import existing_id, home_of, known_home, owner_route
from region_node.errors import InvalidRequest
from region_node.ids import parse_id

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(caller)])


def _no_idempotency_key(request: Request) -> None:
    if request.headers.get("idempotency-key") is not None:
        raise InvalidRequest("Idempotency-Key is not accepted where the response shows a new "
                             "API key (a stored response would keep the key)",
                             code="idempotency_not_supported", param="Idempotency-Key")


def _cursor(raw: str | None, param: str) -> uuid.UUID | None:
    if raw is None:
        return None
    parsed = parse_id(raw)
    if parsed is None:
        raise InvalidRequest(f"{param} must be an id from a previous page", param=param)
    return parsed


@router.post("/principals", status_code=201)
async def create_principal(body: CreatePrincipal, request: Request) -> Response:
    """Create a principal and its first API key; the key is in this response only."""
    _no_idempotency_key(request)
    node = node_of(request)
    home = known_home(request, body.home_region or node.region)
    if (forwarded := await owner_route(request, home)) is not None:
        return forwarded

    async def step(conn: AsyncConnection) -> Result:
        created = await principals.create_principal(
            conn, principal_id=node.new_id(home), name=body.name, role=body.role,
            home_region=home, rate_per_second=body.rate_per_second, rate_burst=body.rate_burst)
        key = await principals.create_key(conn, key_id=node.new_id(home),
                                          principal_id=uuid.UUID(created["id"]),
                                          home_region=home)
        return 201, {**created, "api_key": key}

    return await run_mutation(request, step, home=home)


@router.get("/principals")
async def list_principals(request: Request, limit: int = Query(50, ge=1, le=200),
                          starting_after: str | None = None) -> Response:
    """Every principal, oldest first (this region's copy)."""
    cursor = _cursor(starting_after, "starting_after")
    async with node_of(request).db.engine.connect() as conn:
        return JSONResponse(await principals.list_principals(conn, limit=limit,
                                                             starting_after=cursor))


@router.get("/principals/{principal_id}")
async def get_principal(principal_id: str, request: Request) -> Response:
    """One principal (this region's copy)."""
    pid = existing_id(principal_id, "principal")
    async with node_of(request).db.engine.connect() as conn:
        return JSONResponse(await principals.get_principal(conn, pid))


@router.post("/principals/{principal_id}/keys", status_code=201)
async def create_key(principal_id: str, request: Request) -> Response:
    """Another API key for a principal (e.g. to rotate); shown in this response only."""
    _no_idempotency_key(request)
    pid = existing_id(principal_id, "principal")
    node = node_of(request)
    home = home_of(request, pid)
    if (forwarded := await owner_route(request, home)) is not None:
        return forwarded
    key_home = home or node.region

    async def step(conn: AsyncConnection) -> Result:
        return 201, await principals.create_key(conn, key_id=node.new_id(key_home),
                                                principal_id=pid, home_region=key_home)

    return await run_mutation(request, step, home=home)


@router.get("/principals/{principal_id}/keys")
async def list_keys(principal_id: str, request: Request) -> Response:
    """A principal's keys: id, prefix, created, revoked (never a secret)."""
    pid = existing_id(principal_id, "principal")
    async with node_of(request).db.engine.connect() as conn:
        return JSONResponse(await principals.list_keys(conn, pid))


async def _revoke(request: Request, key_id: str) -> Response:
    kid = existing_id(key_id, "key")
    node = node_of(request)
    home = home_of(request, kid)
    authenticator: principals.Authenticator = request.app.state.authenticator
    if (forwarded := await owner_route(request, home)) is not None:
        authenticator.forget(kid)  # stop honouring it here at once, too
        return forwarded

    async def step(conn: AsyncConnection) -> Result:
        return 200, await principals.revoke_key(conn, key_id=kid,
                                                revocation_id=node.new_id(home or node.region),
                                                region=node.region)

    response = await run_mutation(request, step, home=home)
    authenticator.forget(kid)
    return response


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request) -> Response:
    """Revoke a key: refused at once by this node, within the auth cache's few seconds by
    every other node (plus replication lag in other regions)."""
    return await _revoke(request, key_id)


@router.post("/keys/{key_id}/revoke")
async def revoke_key_post(key_id: str, request: Request) -> Response:
    """The same as DELETE /v1/admin/keys/{key_id}, for clients that cannot send DELETE."""
    return await _revoke(request, key_id)


@router.get("/audit")
async def audit_trail(request: Request, limit: int = Query(50, ge=1, le=500),
                      cursor: str | None = None, principal_id: str | None = None,
                      action: str | None = Query(None, max_length=100)) -> Response:
    """The audit trail, newest first (this region's copy: every region's rows, as far as
    they have replicated). Page on with `cursor=<next_cursor>`."""
    after = _cursor(cursor, "cursor")
    who = _cursor(principal_id, "principal_id")
    async with node_of(request).db.engine.connect() as conn:
        return JSONResponse(await audit.page(conn, limit=limit, cursor=after, principal_id=who,
                                             action=action))
