"""Routes: webhook endpoints (register, list, rotate the secret, delete) and their
delivery log. Only the endpoint's principal, or an admin, may see or change one.

The writes are plain inserts into replicated, insert-only tables (region_node/webhooks/
store.py), so any region takes them itself; nothing is forwarded. A read in another
region sees a new endpoint once it has replicated there.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, StrictInt, field_validator
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node.access import require
from region_node.api.audit_trail import mark_audited, record_in
from region_node.api.auth import caller
from region_node.api.models import Body
from region_node.api.mutation import node_of
from region_node.api.routing import existing_id
from region_node.errors import InvalidRequest
from region_node.principals import Principal
from region_node.webhooks import store

router = APIRouter(prefix="/v1/webhook_endpoints", tags=["webhooks"],
                   dependencies=[Depends(caller)])

Caller = Annotated[Principal, Depends(caller)]

EVENT_FAMILIES = ("payment", "order", "refund")
# Refunds announce only how they ended (region_node/refunds.py): other refund types are a
# typo that would never receive anything.
_EVENT_TYPE = re.compile(
    r"^(\*|(payment|order)\.(\*|[a-z_]{1,40})|refund\.(\*|succeeded|failed))$")
MAX_URL_LENGTH = 2048
DEFAULT_GRACE_SECONDS = 24 * 3600
MAX_GRACE_SECONDS = 7 * 24 * 3600


def check_url(url: str) -> str:
    """An absolute http(s) URL with a host and no credentials in it."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"url is longer than {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("url must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("url needs a host")
    if parts.username or parts.password:
        # It would be stored and shown in listings and logs: put secrets in the path
        # only if you must, better verify our signature.
        raise ValueError("url must not carry a user name or password")
    if parts.fragment:
        raise ValueError("url must not have a #fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError as exc:
        raise ValueError(f"url has a bad port: {exc}") from None
    return url


class CreateEndpoint(Body):
    """POST /v1/webhook_endpoints."""

    url: str = Field(..., min_length=1)
    event_types: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                                   max_length=32)

    _check_url = field_validator("url")(check_url)

    @field_validator("event_types")
    @classmethod
    def _check_types(cls, value: list[str]) -> list[str]:
        for item in value:
            if not _EVENT_TYPE.match(item):
                raise ValueError(f"unknown event type '{item[:60]}': use '*', a family "
                                 f"({', '.join(f'{f}.*' for f in EVENT_FAMILIES)}) "
                                 "or a type such as 'payment.succeeded'")
        return sorted(set(value))


class RotateSecret(Body):
    """POST /v1/webhook_endpoints/{id}/rotate_secret."""

    expire_old_after_seconds: StrictInt = Field(DEFAULT_GRACE_SECONDS, ge=0,
                                                le=MAX_GRACE_SECONDS)


def _no_idempotency_key(request: Request) -> None:
    """A replayed response would have to store the secret it shows: refuse the header
    rather than ignore it (a client relying on it would register twice)."""
    if request.headers.get("idempotency-key") is not None:
        raise InvalidRequest("Idempotency-Key is not accepted where the response shows a new "
                             "webhook secret", code="idempotency_not_supported",
                             param="Idempotency-Key")


async def _audit(conn: AsyncConnection, request: Request, status: int,
                 endpoint_id: uuid.UUID) -> None:
    """The audit row in the change's own transaction (never with the secret), so the
    trail middleware does not write a second one."""
    await record_in(conn, request, status, {"id": str(endpoint_id)})
    mark_audited(request)


async def _owned(conn: AsyncConnection, raw_id: str, principal: Principal) -> store.Endpoint:
    """The endpoint, if the caller may touch it: 404 if it does not exist, else 403."""
    endpoint = await store.get_endpoint(conn, existing_id(raw_id, "webhook endpoint"))
    require(principal, [endpoint.principal_id], "webhook endpoint")
    return endpoint


@router.post("", status_code=201)
async def create_endpoint(body: CreateEndpoint, request: Request, principal: Caller) -> Response:
    """Register an endpoint; the response shows its signing secret, this once only.

    An admin's endpoint receives every event; anyone else's, the events about payments
    whose payer or payee account is theirs.
    """
    _no_idempotency_key(request)
    node = node_of(request)

    async def step(conn: AsyncConnection) -> tuple[store.Endpoint, str]:
        created = await store.create_endpoint(
            conn, endpoint_id=node.new_id(node.region), secret_id=node.new_id(node.region),
            principal_id=principal.id, url=body.url, event_types=body.event_types,
            receives_all=principal.is_admin, home_region=node.region)
        await _audit(conn, request, 201, created[0].id)
        return created

    endpoint, secret = await node.db.transaction(step)
    return JSONResponse({**endpoint.to_api(), "secret": secret}, status_code=201)


@router.get("")
async def list_endpoints(request: Request, principal: Caller) -> Response:
    """The caller's endpoints (an admin sees everyone's), without secrets."""
    async with node_of(request).db.engine.connect() as conn:
        endpoints = await store.list_endpoints(
            conn, None if principal.is_admin else principal.id)
    return JSONResponse({"object": "list", "data": [e.to_api() for e in endpoints]})


@router.get("/{endpoint_id}")
async def get_endpoint(endpoint_id: str, request: Request, principal: Caller) -> Response:
    """One endpoint, without its secrets."""
    async with node_of(request).db.engine.connect() as conn:
        endpoint = await _owned(conn, endpoint_id, principal)
    return JSONResponse(endpoint.to_api())


@router.post("/{endpoint_id}/rotate_secret")
async def rotate_secret(endpoint_id: str, request: Request, principal: Caller,
                        body: RotateSecret | None = None) -> Response:
    """A new secret (shown this once). Older secrets stay valid for
    `expire_old_after_seconds` (default a day; 0 retires them at once), and meanwhile
    every delivery carries one `v1` signature per valid secret."""
    _no_idempotency_key(request)
    node = node_of(request)
    grace = timedelta(seconds=(body or RotateSecret()).expire_old_after_seconds)

    async def step(conn: AsyncConnection) -> Response:
        endpoint = await _owned(conn, endpoint_id, principal)
        secret, expires_at = await store.rotate_secret(
            conn, endpoint_id=endpoint.id, secret_id=node.new_id(node.region),
            expire_old_after=grace)
        await _audit(conn, request, 200, endpoint.id)
        return JSONResponse({**endpoint.to_api(), "secret": secret,
                             "previous_secrets_expire_at": expires_at.isoformat()})

    return await node.db.transaction(step)


@router.delete("/{endpoint_id}")
async def delete_endpoint(endpoint_id: str, request: Request, principal: Caller) -> Response:
    """Stop deliveries to the endpoint; its delivery log stays readable by admins."""
    node = node_of(request)

    async def step(conn: AsyncConnection) -> uuid.UUID:
        endpoint = await _owned(conn, endpoint_id, principal)
        await store.delete_endpoint(conn, deletion_id=node.new_id(node.region),
                                    endpoint_id=endpoint.id, deleted_by=principal.id)
        await _audit(conn, request, 200, endpoint.id)
        return endpoint.id

    deleted = await node.db.transaction(step)
    return JSONResponse({"id": str(deleted), "object": "webhook_endpoint", "deleted": True})


@router.get("/{endpoint_id}/deliveries")
async def deliveries(endpoint_id: str, request: Request, principal: Caller,
                     limit: int = Query(20, ge=1, le=100)) -> Response:
    """The newest deliveries to the endpoint, each with every attempt: time, status code,
    short error, next attempt time, and whether it was delivered or finally failed."""
    async with node_of(request).db.engine.connect() as conn:
        endpoint = await _owned(conn, endpoint_id, principal)
        log = await store.delivery_log(conn, endpoint.id, limit=limit)
    return JSONResponse({"object": "list", "data": log})
