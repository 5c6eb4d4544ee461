"""The payment fast path (region_node/api/payment_fast_path.py) serves only what FastAPI
would accept, and hands everything else to FastAPI byte for byte.

These are ASGI-level checks of the middleware on its own. The payments it does serve
are the API tests' payments (test_hot_path, test_auth's audit rows, test_validation's
refusals, test_rate_limit's 429s), which all go through it in a running node.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from region_node.api import payments
from region_node.api.middleware import replaying
from region_node.api.payment_fast_path import PaymentFastPath

VALID = {"payer": "acct_x", "payee": "acct_y", "amount": 100, "currency": "USD"}


class _Inner:
    """The rest of the app: records what reached it and answers 299."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        self.calls.append((scope["method"], scope["path"], message.get("body", b"")))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def _call(app: PaymentFastPath, method: str, path: str, body: bytes,
                headers: dict[str, str]) -> tuple[Scope, list[Message]]:
    scope: dict[str, Any] = {
        "type": "http", "method": method, "path": path, "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "app": SimpleNamespace(state=SimpleNamespace()), "state": {}}
    sent: list[Message] = []

    async def disconnected() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, replaying(body, disconnected), send)
    return scope, sent


async def test_bodies_fastapi_must_judge_reach_it_unchanged() -> None:
    inner = _Inner()
    app = PaymentFastPath(inner)
    cases = [
        (b"{", "application/json"),                                  # not JSON
        (b"[]", "application/json"),                                 # not an object
        (json.dumps({**VALID, "amount": -1}).encode(), "application/json"),
        (json.dumps({**VALID, "extra": 1}).encode(), "application/json"),
        (json.dumps(VALID).encode(), "text/plain"),                  # not declared JSON
        (json.dumps(VALID).encode(), ""),                            # no content type
        (b"", "application/json"),
    ]
    for body, content_type in cases:
        headers = {"content-type": content_type} if content_type else {}
        _, sent = await _call(app, "POST", "/v1/payments", body, headers)
        assert inner.calls[-1] == ("POST", "/v1/payments", body), (body, content_type)
        assert sent[0]["status"] == 299
    assert len(inner.calls) == len(cases)


async def test_other_routes_pass_through() -> None:
    inner = _Inner()
    app = PaymentFastPath(inner)
    body = json.dumps(VALID).encode()
    for method, path in [("GET", "/v1/payments"), ("POST", "/v1/payments/x/capture"),
                         ("POST", "/v1/payments/"), ("POST", "/v1/accounts")]:
        await _call(app, method, path, body, {"content-type": "application/json"})
        assert inner.calls[-1] == (method, path, body)
    assert len(inner.calls) == 4


async def test_a_valid_body_is_served_here_in_the_error_shape_and_as_the_route() -> None:
    inner = _Inner()
    app = PaymentFastPath(inner)
    # No Authorization header: the route's dependency refuses it, as FastAPI would run it.
    scope, sent = await _call(app, "POST", "/v1/payments", json.dumps(VALID).encode(),
                              {"content-type": "application/json; charset=utf-8"})
    assert inner.calls == []
    start, end = sent
    assert start["status"] == 401
    headers = dict(start["headers"])
    assert headers[b"www-authenticate"] == b'Bearer realm="paycluster"'
    error = json.loads(end["body"])["error"]
    assert error["code"] == "missing_api_key" and error["type"] == "authentication_error"
    # What the request metrics and the audit trail read: the route's template and action.
    assert scope["route"].path == "/v1/payments"
    assert scope["endpoint"] is payments.create
