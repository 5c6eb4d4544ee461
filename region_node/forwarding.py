"""What a forwarded request carries between regions: header names, the allow-list of
client headers, and the per-process token that makes a carried principal trusted.

A write for data another region owns is forwarded over gRPC (api/routing.py) and
replayed against the owner's own app in-process (rpc/server.py). The forwarding region,
which authenticated the caller, sends the principal along (FORWARDED_PRINCIPAL) instead of
the key; the owner's gRPC server adds INTERNAL_TOKEN, a random token made at process
start that only in-process code knows, and api/auth.py trusts the principal only next to
it. A client cannot forge it: it never sees the token, and the forwarder copies only
FORWARD_HEADERS, never these two.

`ForwardedRequest` and `ForwardedResponse` are what travels (rpc/wire.py converts them to
and from protobuf). This module imports no web or RPC framework, so both the HTTP side
(api/) and the gRPC side (rpc/) use it without importing each other.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any, NamedTuple

FORWARDED_FROM = "paycluster-forwarded-from"
"""HTTP header on a request that another region forwarded here: never forward it again."""

FORWARD_HEADERS = ("content-type", "idempotency-key", "x-request-id", "traceparent",
                   "authorization", "user-agent", "accept",
                   # The owner verifies a forwarded channel callback itself.
                   "channel-signature")
"""Request headers worth carrying to the owner; hop-by-hop and host headers are not."""

FORWARDED_PRINCIPAL = "paycluster-principal"
"""Header with the principal a forwarding region authenticated (JSON)."""

INTERNAL_TOKEN = "paycluster-internal-token"
"""Header set only by this process's gRPC server when it replays a forwarded request."""


def new_internal_token() -> str:
    """A fresh per-process token (kept as ``app.state.internal_token``)."""
    return secrets.token_urlsafe(32)


def trusted_forward_headers(app: Any, headers: dict[str, str]) -> dict[str, str]:
    """Headers for replaying a forwarded request in-process (used by the gRPC server):
    any token a peer sent is dropped, and ours is added when a principal came along."""
    out = {k: v for k, v in headers.items() if k.lower() != INTERNAL_TOKEN}
    token = getattr(app.state, "internal_token", None)
    if token and any(k.lower() == FORWARDED_PRINCIPAL for k in out):
        out[INTERNAL_TOKEN] = token
    return out


def token_matches(presented: str, expected: str) -> bool:
    """Whether a presented internal token is this process's (constant-time compare)."""
    return hmac.compare_digest(presented.encode(), expected.encode())


class Header(NamedTuple):
    """One header of a forwarded request or response (repeats and order are kept)."""

    name: str
    value: str


@dataclass(frozen=True)
class ForwardedRequest:
    """A public API request replayed at the region that owns its data."""

    method: str
    path: str
    origin_region: str
    query: str = ""
    headers: tuple[Header, ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class ForwardedResponse:
    """The owner's answer to a forwarded request, and which region served it."""

    status: int
    served_by: str
    headers: tuple[Header, ...] = ()
    body: bytes = b""
