"""ASGI middleware: request ids, body size limit, unstorable strings, request metrics.

Plain ASGI (not BaseHTTPMiddleware) so bodies stream and nothing is buffered twice.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from region_node import tracing
from region_node.api.errors import error_response
from region_node.errors import InvalidRequest, PayloadTooLarge
from region_node.logs import request_id, traceparent
from region_node.metrics import NodeMetrics
from region_node.redact import scrub


class RequestContext:
    """Gives every request an id (kept from `x-request-id` if the caller sent one) and a
    trace context, echoes the id back with the serving and owning regions, and counts
    the request in the metrics by its route template."""

    def __init__(self, app: ASGIApp, metrics: NodeMetrics, region: str) -> None:
        self.app = app
        self.metrics = metrics
        self.region = region.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        # The client's id goes into every log line and the audit trail: scrubbed like any
        # other client text (someone will send a card number or a key as a request id).
        rid = scrub(headers.get(b"x-request-id", b"").decode("latin-1")[:128])
        # An id is a token: one with control characters (NUL) is not kept, it could not
        # be logged, stored in the audit trail or sent back in a header.
        if not rid.isprintable():
            rid = ""
        rid = rid or uuid.uuid4().hex
        token = request_id.set(rid)
        span, carried = tracing.enter(
            lambda name: headers.get(name.encode(), b"").decode("latin-1"))
        trace = traceparent.set(span)
        carried_token = tracing.propagated.set(carried)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # W3C `traceresponse`: lets a caller (or a test) see the trace continued.
                extra = [(b"x-request-id", rid.encode("latin-1")),
                         (b"traceresponse", (traceparent.get() or "").encode("latin-1"))]
                names = {k.lower() for k, _ in message.get("headers", [])}
                # Which region answered, and which owns the data (routing.owner_route).
                if b"paycluster-served-by" not in names:
                    extra.append((b"paycluster-served-by", self.region))
                owner = scope.get("state", {}).get("owner")
                if owner and b"paycluster-owner" not in names:
                    extra.append((b"paycluster-owner", owner.encode()))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(scope["method"], template, status,
                                         time.perf_counter() - started)
            request_id.reset(token)
            traceparent.reset(trace)
            tracing.propagated.reset(carried_token)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that hands over `body` as the whole request body (read already), then
    defers to `receive` (for the disconnect)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413 in the error shape.

    API bodies are small, so the body is read up front (never more than max_bytes + one
    chunk) and handed to the app in one piece; the app never sees a partial body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replaying(b"".join(chunks), receive), send)

    async def _reject(self, send: Send) -> None:
        err = PayloadTooLarge(f"Request body is larger than {self.max_bytes} bytes")
        body = json.dumps(err.to_body()).encode()
        await send({"type": "http.response.start", "status": err.http_status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# What PostgreSQL cannot store in text: NUL, and (not encodable in UTF-8) an unpaired
# surrogate, which JSON can spell "\\ud800" and Python decodes as is.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def _shown(name: str) -> str:
    """A client-chosen name made printable for the error's `param` (NUL as \\u0000)."""
    return _UNSTORABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", name)


def _first_unstorable(value: object, where: list[str]) -> list[str] | None:
    """Path (keys and list indexes) to the first key or string in a JSON document that
    PostgreSQL cannot store; None if every string is storable."""
    if isinstance(value, str):
        return where if _UNSTORABLE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _UNSTORABLE.search(key):
                return [*where, _shown(key)]
            found = _first_unstorable(item, [*where, key])
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_unstorable(item, [*where, str(i)])
            if found is not None:
                return found
    return None


def unstorable_input(scope: Scope, body: bytes) -> InvalidRequest | None:
    """The 400 for the first string of a request that PostgreSQL cannot store (path,
    query parameters, headers, JSON body), or None."""
    def refuse(where: str, param: str | None) -> InvalidRequest:
        return InvalidRequest(f"Invalid {where}: it contains a character that cannot be "
                              "stored (NUL or an unpaired surrogate)",
                              code="invalid_string", param=param)

    if _UNSTORABLE.search(scope.get("path", "")):
        return refuse("request path", None)
    # Decoded as Starlette decodes it for the routes (so %00 is seen as the NUL it becomes).
    for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                 keep_blank_values=True):
        if _UNSTORABLE.search(name) or _UNSTORABLE.search(value):
            return refuse(f"query parameter '{_shown(name)}'", _shown(name))
    for raw_name, raw_value in scope.get("headers") or ():
        if b"\x00" in raw_value or b"\x00" in raw_name:
            name = _shown(raw_name.decode("latin-1").lower())
            return refuse(f"header '{name}'", name)
    if b"\x00" in body:
        return refuse("request body", None)
    # An escape is the only way left to spell one; documents without any cost nothing.
    if b"\\u" in body:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None  # not JSON: the route answers invalid_json
        where = _first_unstorable(doc, [])
        if where is not None:
            param = ".".join(where) or None
            return refuse(param or "request body", param)
    return None


class StorableInput:
    """Refuse, with 400 `invalid_string` in the error shape, any request that carries a
    string PostgreSQL cannot store - NUL (U+0000) or an unpaired surrogate - in its path,
    a query parameter, a header (Idempotency-Key, ...) or anywhere in its JSON body.

    Once, at the edge, for every route: such a string would otherwise reach SQL and fail
    there as a 500 (or end up in a log line, an audit row or an idempotency key). It runs
    inside BodyLimit (the body is bounded and arrives in one piece) and outside the audit
    trail (a refused request writes nothing)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # client went away
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        body = b"".join(chunks)
        refusal = unstorable_input(scope, body)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        await self.app(scope, replaying(body, receive), send)
