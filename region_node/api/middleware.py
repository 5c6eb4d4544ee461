"""ASGI middleware: request ids, body size limit, request metrics.

Plain ASGI (not BaseHTTPMiddleware) so bodies stream and nothing is buffered twice.
"""

from __future__ import annotations

import json
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from region_node import tracing
from region_node.errors import PayloadTooLarge
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
        rid = scrub(headers.get(b"x-request-id", b"").decode("latin-1")[:128]) or uuid.uuid4().hex
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
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        err = PayloadTooLarge(f"Request body is larger than {self.max_bytes} bytes")
        body = json.dumps(err.to_body()).encode()
        await send({"type": "http.response.start", "status": err.http_status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
