"""HTTP: the merchant API (what our regions call) and the admin API (faults, differences).

Errors have one shape, `{"error": {"type", "code", "message", "param"?}}`. Validation
errors never echo the input (it may hold a card number). Mutations answer 201 when they
created the operation and 200 with `Idempotent-Replayed: true` when the reference was
known (a retry); results that take time (authorization, refund, payout) arrive by
callback and by `GET /v1/operations/{reference}`.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from channel.cards import TEST_BANK_ACCOUNTS, BankOutcome, InvalidCard, tokenize
from channel.engine import Channel, ChannelError
from channel.faults import DownMode, FaultConfig
from channel.models import (
    AuthorizeIn,
    CaptureIn,
    DifferenceIn,
    DownIn,
    Operation,
    PayoutIn,
    RefundIn,
)

Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, code: str, message: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "api_error" if status >= 500 else "invalid_request_error"
    body: dict[str, Any] = {"type": kind, "code": code, "message": message}
    if param:
        body["param"] = param
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _install_errors(app: FastAPI) -> None:
    async def channel_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ChannelError)
        return _error(exc.status, exc.code, exc.message, exc.param)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # The message of pydantic, never its `input`: that may be a card number.
        return _error(400, "invalid_request", str(first.get("msg", "invalid request")),
                      ".".join(loc) or None)

    app.add_exception_handler(ChannelError, channel_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def _bearer_guard(app: FastAPI, key: Callable[[], str], open_paths: set[str]) -> None:
    @app.middleware("http")
    async def auth(request: Request, call_next: Handler) -> Response:
        if request.url.path not in open_paths:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {key()}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return _error(401, "unauthorized", "a valid Bearer key is required")
        return await call_next(request)


def _answer(op: Operation, created: bool) -> JSONResponse:
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return JSONResponse(op.public(), status_code=201 if created else 200, headers=headers)


def merchant_app(channel: Channel) -> FastAPI:
    """The API our regions call: payments, refunds, payouts, status, statements."""
    app = FastAPI(title="paycluster channel (acquirer simulator)", docs_url=None,
                  redoc_url=None, openapi_url=None)
    _install_errors(app)
    faults = channel.faults

    @app.middleware("http")
    async def outage(request: Request, call_next: Handler) -> Response:
        # Modes "refuse" and "reset" replace the listener (see channel.__main__); this is
        # "503".
        remaining = faults.down_remaining
        if remaining > 0:
            return _error(503, "channel_down", "the channel is temporarily unavailable",
                          headers={"Retry-After": str(max(1, round(remaining)))})
        return await call_next(request)

    _bearer_guard(app, lambda: channel.settings.api_key, {"/health"})

    async def gate(operation: str, reference: str) -> str:
        """Injected faults before a call takes effect: hang, then maybe a 500."""
        key = faults.call_key(operation, reference)
        if faults.decide("hang_rate", key):
            await asyncio.sleep(faults.config.hang_seconds)
        if faults.decide("error_rate", key):
            raise ChannelError(500, "internal_error", "injected fault: internal error")
        return key

    def after(key: str, response: JSONResponse) -> JSONResponse:
        """Injected fault after a call took effect: the caller sees a 500 anyway."""
        if faults.decide("error_after_rate", key):
            return _error(500, "internal_error", "injected fault: internal error")
        return response

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/payments")
    async def authorize(body: AuthorizeIn) -> JSONResponse:
        # Tokenize first, before anything else sees the request: from here on only the
        # token, first six and last four exist. The number itself dies with `body`.
        today = datetime.now(UTC).date()
        expired = (body.card.exp_year, body.card.exp_month) < (today.year, today.month)
        try:
            card = tokenize(body.card.number, channel.settings.token_key, expired)
        except InvalidCard as exc:
            raise ChannelError(400, "incorrect_number", str(exc), "card.number") from None
        key = await gate("authorize", body.reference)
        op, created = channel.authorize(body, card)
        return after(key, _answer(op, created))

    @app.post("/v1/payments/{reference}/capture")
    async def capture(reference: str, body: CaptureIn | None = None) -> JSONResponse:
        key = await gate("capture", reference)
        op, created = channel.capture(reference, body.amount if body else None)
        return after(key, _answer(op, created))

    @app.post("/v1/refunds")
    async def refund(body: RefundIn) -> JSONResponse:
        key = await gate("refund", body.reference)
        op, created = channel.refund(body)
        return after(key, _answer(op, created))

    @app.post("/v1/payouts")
    async def payout(body: PayoutIn) -> JSONResponse:
        key = await gate("payout", body.reference)
        outcome = TEST_BANK_ACCOUNTS.get(body.bank_account.account_number, BankOutcome.PAY)
        op, created = channel.payout(body, outcome)
        return after(key, _answer(op, created))

    @app.get("/v1/operations/{reference}")
    async def status(reference: str) -> JSONResponse:
        await gate("status", reference)
        return JSONResponse(channel.get(reference).public())

    @app.get("/v1/statements/{day}.csv")
    async def statement(day: date) -> PlainTextResponse:
        return PlainTextResponse(channel.statement_csv(day), media_type="text/csv")

    return app


def admin_app(channel: Channel, down: Callable[[float, DownMode], Awaitable[None]],
              up: Callable[[], Awaitable[None]]) -> FastAPI:
    """The operations console: faults, outages, callback log, statement differences.

    `down` and `up` are the server's: modes `refuse` and `reset` replace the merchant
    listener, which
    only the process running it can do.
    """
    app = FastAPI(title="paycluster channel admin", docs_url=None, redoc_url=None,
                  openapi_url=None)
    _install_errors(app)
    _bearer_guard(app, lambda: channel.settings.admin_key, {"/health"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "down_seconds": channel.faults.down_remaining}

    @app.get("/admin/faults")
    async def get_faults() -> dict[str, Any]:
        return {"config": channel.faults.config.model_dump(),
                "fired": list(channel.faults.fired),
                "down_seconds": channel.faults.down_remaining,
                "down_mode": channel.faults.down_mode.value}

    @app.put("/admin/faults")
    async def put_faults(config: FaultConfig) -> dict[str, Any]:
        channel.set_faults(config)
        return {"config": channel.faults.config.model_dump()}

    @app.post("/admin/down")
    async def go_down(body: DownIn) -> dict[str, Any]:
        await down(body.seconds, DownMode(body.mode))
        return {"down_seconds": channel.faults.down_remaining, "mode": body.mode}

    @app.post("/admin/up")
    async def come_up() -> dict[str, Any]:
        await up()
        return {"down_seconds": 0.0}

    @app.get("/admin/callbacks")
    async def callbacks(reference: str | None = None) -> list[dict[str, Any]]:
        return [d.public() for d in channel.dispatcher.deliveries.values()
                if reference is None or d.event["data"]["reference"] == reference]

    @app.get("/admin/operations")
    async def operations() -> list[dict[str, Any]]:
        return [op.public() for op in channel.operations.values()]

    @app.post("/admin/statement-differences", status_code=201)
    async def add_difference(body: DifferenceIn) -> dict[str, Any]:
        return channel.add_difference(body).__dict__

    @app.get("/admin/statement-differences")
    async def differences() -> list[dict[str, Any]]:
        return [d.__dict__ for d in channel.differences.values()]

    @app.delete("/admin/statement-differences")
    async def clear_differences() -> dict[str, int]:
        channel.clear_differences()
        return {"count": 0}

    return app
