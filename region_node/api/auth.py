"""Authentication of every /v1 call: `Authorization: Bearer pck_<prefix>_<secret>`.

`caller` (a FastAPI dependency on every /v1 router) turns the key into a `Principal`
(region_node/principals.py: lookup by prefix, constant-time hash compare, short cache),
stores it as `request.state.principal`, and then takes a token from the caller's rate
limit bucket (if the app has a limiter). A missing, malformed, unknown or revoked key is
a 401 whose message never repeats the key. `require_admin` guards admin-only routes.

Forwarded requests. A write for data another region owns is forwarded over gRPC (see
api/routing.py) and replayed against the owner's own app in-process. The owner does not
authenticate the key again: a key created a moment ago in the forwarding region may not
have replicated to the owner yet. Instead the forwarding region, which authenticated the
caller, sends the principal along (header `paycluster-principal`, JSON) and leaves the key
itself out. The owner's gRPC server - reachable only by peer regions, which mutual TLS
authenticates - adds a second header carrying a random token made at process start
(`app.state.internal_token`) that only in-process code knows; `caller` trusts a
`paycluster-principal` header only next to that token. A client cannot forge it: it never
sees the token, and the forwarder copies only an allow-list of client headers
(FORWARD_HEADERS), never these two. The header names, the allow-list and the token live
in region_node/forwarding.py. The rate limit is taken once, where the request entered the
cluster.
"""

from __future__ import annotations

import json

from fastapi import Depends, FastAPI, Request

from region_node.access import require_admin as _require_admin
from region_node.errors import Unauthenticated
from region_node.forwarding import (
    FORWARDED_PRINCIPAL,
    INTERNAL_TOKEN,
    new_internal_token,
    token_matches,
)
from region_node.principals import Authenticator, Principal

ADMIN_PATHS = ("/v1/admin/", "/v1/replication/")
"""Paths only admins may call, whichever router serves them (operator and admin APIs)."""


def install(app: FastAPI, authenticator: Authenticator) -> None:
    """Give the app its authenticator and its per-process internal token."""
    app.state.authenticator = authenticator
    app.state.internal_token = new_internal_token()


def principal_header(request: Request) -> tuple[str, str] | None:
    """(name, value) of the header that carries this request's principal to the owner."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:
        return None
    return FORWARDED_PRINCIPAL, json.dumps(principal.to_json(), separators=(",", ":"))


def _forwarded(request: Request) -> Principal | None:
    raw = request.headers.get(FORWARDED_PRINCIPAL)
    token = request.headers.get(INTERNAL_TOKEN)
    expected = getattr(request.app.state, "internal_token", None)
    if raw is None or token is None or not expected:
        return None
    if not token_matches(token, str(expected)):
        return None
    try:
        return Principal.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        return None


def bearer_key(request: Request) -> str:
    """The key of `Authorization: Bearer <key>`; 401 if missing or malformed."""
    header = request.headers.get("authorization")
    if not header:
        raise Unauthenticated("No API key provided: send 'Authorization: Bearer <key>'",
                              code="missing_api_key")
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("Malformed Authorization header: expected 'Bearer <key>'")
    return key.strip()


async def caller(request: Request) -> Principal:
    """The authenticated principal of this request (see the module docstring); admins
    only on ADMIN_PATHS."""
    known: Principal | None = getattr(request.state, "principal", None)
    if known is not None:
        return known
    principal = _forwarded(request)
    if principal is None:
        key = bearer_key(request)
        authenticator: Authenticator = request.app.state.authenticator
        principal = await authenticator.authenticate(key)
        request.state.principal = principal
        limiter = getattr(request.app.state, "rate_limiter", None)
        if limiter:
            await limiter.take(str(principal.key_id), principal.rate_per_second,
                               principal.rate_burst)
    request.state.principal = principal
    # The scope's path, not request.url: building the whole URL costs every call.
    if request.scope["path"].startswith(ADMIN_PATHS):
        _require_admin(principal)
    return principal


async def require_admin(principal: Principal = Depends(caller)) -> Principal:
    """Dependency: the caller, who must be an admin (403 otherwise)."""
    _require_admin(principal)
    return principal


def principal_of(request: Request) -> Principal:
    """The principal `caller` stored on this request (routes run after it)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:
        raise Unauthenticated("No API key provided: send 'Authorization: Bearer <key>'",
                              code="missing_api_key")
    return principal
