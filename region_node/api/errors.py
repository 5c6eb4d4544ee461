"""Domain errors and framework errors mapped once to HTTP, all in the one error shape."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from region_node.errors import (
    InvalidRequest,
    NotFound,
    PaymentError,
    RateLimited,
    Unauthenticated,
)

log = logging.getLogger(__name__)

# pydantic error types -> our stable error codes
_CODES = {
    "json_invalid": "invalid_json",
    "extra_forbidden": "unknown_parameter",
    "missing": "parameter_missing",
    "int_type": "invalid_integer",
    "int_from_float": "invalid_integer",
    "int_parsing": "invalid_integer",
    "greater_than": "invalid_amount",
    "literal_error": "invalid_value",
    "value_error": "invalid_value",
    "string_too_long": "invalid_value",
    "bool_type": "invalid_value",
    "model_attributes_type": "invalid_json",
    "dict_type": "invalid_json",
}


def error_response(exc: PaymentError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The HTTP response for a domain error (429 carries Retry-After in whole seconds,
    401 a WWW-Authenticate challenge)."""
    headers = dict(headers or {})
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(exc, RateLimited) or retry_after is not None:
        # 429, and a 503 that knows when to come back (the channel's breaker).
        headers["Retry-After"] = str(max(1, math.ceil(retry_after or 1.0)))
    elif isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="paycluster"'
    return JSONResponse(exc.to_body(), status_code=exc.http_status, headers=headers or None)


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """Turn the first pydantic complaint into a clear 400 naming the parameter."""
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    kind = str(first.get("type", "invalid_request"))
    code = _CODES.get(kind, "invalid_request")
    if kind == "json_invalid":
        message = "Request body is not valid JSON"
        param = None
    elif kind == "extra_forbidden":
        message = f"Received unknown parameter: {param}"
    elif kind == "missing":
        message = f"Missing required parameter: {param}"
    else:
        message = f"Invalid {param or 'request'}: {first.get('msg', 'invalid value')}"
    return InvalidRequest(message, code=code, param=param)


def install(app: FastAPI) -> None:
    """Register the exception handlers on the app."""

    @app.exception_handler(PaymentError)
    async def _domain(_: Request, exc: PaymentError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound("Unrecognized request URL"))
        err = PaymentError(str(exc.detail), code="http_error")
        err.http_status = exc.status_code
        err.type = "invalid_request_error"
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(PaymentError("An internal error occurred"))
