"""POST /v1/payments without FastAPI's per-request machinery.

A payment is the request the node serves most, and FastAPI's routing, dependency
solving, exception middleware and exit stacks cost about a fifth of a loaded node's CPU
around it (py-spy, `paycluster bench`). This ASGI middleware serves that one route by
calling the same functions the route does, in the same order FastAPI would:

1. the body is parsed (`json.loads`, as FastAPI does) and validated against the route's
   own model `CreatePayment`; anything that does not validate, or any body that is not
   JSON, is handed to FastAPI unchanged, so every refusal keeps its one shape
   (api/errors.py);
2. the caller is authenticated and rate limited by the route's dependency
   (`api.auth.caller`), which also stores the principal for the audit trail;
3. the route function `api.payments.create` runs and its response is sent.

A domain error raised by 2 or 3 is answered with `api.errors.error_response`, the
mapping FastAPI's exception handler uses; anything else propagates to the outer
`ServerErrorMiddleware`, as it would from the route. The matched route is put in the
scope, so the request metrics and the audit trail see `POST /v1/payments` and
`payments.create` either way. It sits inside the audit trail and the body limit, so the
body arrives in one piece and is bounded.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from region_node.api import payments
from region_node.api.auth import caller
from region_node.api.errors import error_response
from region_node.api.middleware import replaying
from region_node.api.models import CreatePayment
from region_node.errors import PaymentError


class PaymentFastPath:
    """ASGI middleware serving `POST /v1/payments` directly (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # The route as declared (prefix included): what the request metrics (its path)
        # and the audit trail (its endpoint) read from the scope.
        self.route = next(route for route in payments.router.routes
                          if isinstance(route, APIRoute) and route.endpoint is payments.create)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"] != self.route.path):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        raw = await request.body()
        body = _valid_body(request, raw)
        if body is None:
            # FastAPI answers it (a 400 in the error shape), from the same bytes.
            await self.app(scope, replaying(raw, receive), send)
            return
        scope["route"] = self.route
        scope["endpoint"] = payments.create
        scope.setdefault("path_params", {})
        try:
            await caller(request)
            response = await payments.create(body, request)
        except PaymentError as exc:
            response = error_response(exc)
        await response(scope, receive, send)


def _valid_body(request: Request, raw: bytes) -> CreatePayment | None:
    """The body as the route's model, or None if FastAPI should judge it."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        return None
    try:
        document: Any = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    try:
        return CreatePayment.model_validate(document)
    except ValidationError:
        return None
