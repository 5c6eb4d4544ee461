"""Where audit rows are written (region_node/audit.py holds the table's SQL).

- A mutation that commits: its audit row is inserted in the SAME transaction as the effect
  (`record_in`, called by api/mutation.run_mutation), so an effect never exists without
  its row and the money path pays one small insert, not a transaction of its own.
- Everything else that should leave a trace - a refused call (401, 403), a mutation that
  failed (402, 404, 409, 422...), a replayed idempotent response, an admin route that does
  not use run_mutation - is recorded by the `AuditTrail` middleware after the response
  has been sent, in a transaction of its own (best effort: a failure is logged, the
  client's answer is unaffected).
- A request this region forwarded to the data's owner is recorded by the owner (it sees
  the forwarded principal), not twice.

The action is ``<area>.<route>`` from the matched route (e.g. ``payments.create``,
``accounts.deposit``, ``admin.revoke_key``); the resource is the id in the path, or the id
of what was created.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from region_node import audit
from region_node.logs import request_id
from region_node.principals import Principal

log = logging.getLogger(__name__)

_READS = frozenset({"GET", "HEAD", "OPTIONS"})
AUDITED = "audited"
"""request.state flag: this request's audit row is already written (or not ours)."""


def action_of(scope: Scope) -> str:
    """``<area>.<route>`` of the matched route, e.g. ``payments.create``."""
    route = scope.get("route")
    endpoint = getattr(route, "endpoint", None)
    if endpoint is None:
        return f"{scope.get('method', '?')} {scope.get('path', '')}"[:100]
    area = str(getattr(endpoint, "__module__", "")).rsplit(".", 1)[-1]
    return f"{area}.{getattr(endpoint, '__name__', 'call')}"


def resource_of(scope: Scope, body: dict[str, Any] | None = None) -> str | None:
    """The id in the path, else the id of what the response created."""
    params = scope.get("path_params") or {}
    if params:
        return ",".join(str(v) for v in params.values())
    if isinstance(body, dict) and body.get("id") is not None:
        return str(body["id"])
    return None


async def record_in(conn: AsyncConnection, request: Request, status: int,
                    body: dict[str, Any] | None) -> None:
    """Append this request's audit row in the caller's transaction (see module doc)."""
    node = request.app.state.node
    principal: Principal | None = getattr(request.state, "principal", None)
    await audit.record(conn, row_id=node.new_id(node.region), region=node.region,
                       key_id=principal.key_id if principal else None,
                       principal_id=principal.id if principal else None,
                       action=action_of(request.scope), resource=resource_of(request.scope, body),
                       request_id=request_id.get(), status=status)


def mark_audited(request: Request) -> None:
    """No row to write after the response: already written, or the owner writes it."""
    request.state.audited = True


class AuditTrail:
    """ASGI middleware: after the response, the audit row of a /v1 call that needs one and
    has none yet (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            state = scope.get("state") or {}
            refused = status in (401, 403)
            if (refused or scope["method"] not in _READS) and not state.get(AUDITED):
                if scope.get("route") is not None or refused:
                    await self._write(scope, state, status)

    async def _write(self, scope: Scope, state: dict[str, Any], status: int) -> None:
        app = scope.get("app")
        node = getattr(getattr(app, "state", None), "node", None)
        if node is None:
            return
        principal: Principal | None = state.get("principal")
        try:
            async with node.db.engine.begin() as conn:
                await audit.record(conn, row_id=node.new_id(node.region), region=node.region,
                                   key_id=principal.key_id if principal else None,
                                   principal_id=principal.id if principal else None,
                                   action=action_of(scope), resource=resource_of(scope),
                                   request_id=request_id.get(), status=status)
        except Exception as exc:  # the trail must never break the API; say so loudly
            log.error("audit row for %s %s (status %d) not written: %s",
                      scope.get("method"), scope.get("path"), status, exc)

