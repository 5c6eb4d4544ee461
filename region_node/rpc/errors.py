"""Domain errors mapped once to gRPC status codes, and back.

The caller gets the exact domain error back (type, code, message, param travel in
trailing metadata), so a request forwarded to another region fails exactly as it would
have failed locally.
"""

from __future__ import annotations

import grpc

from region_node import errors as e

_TO_GRPC: list[tuple[type[e.PaymentError], grpc.StatusCode]] = [
    # Most specific first.
    (e.IdempotencyInProgress, grpc.StatusCode.ABORTED),
    (e.IdempotencyMismatch, grpc.StatusCode.ALREADY_EXISTS),
    (e.PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (e.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (e.Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (e.RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.InsufficientFunds, grpc.StatusCode.FAILED_PRECONDITION),
    (e.NotFound, grpc.StatusCode.NOT_FOUND),
    (e.Conflict, grpc.StatusCode.ABORTED),
    (e.RegionUnavailable, grpc.StatusCode.UNAVAILABLE),
]

_BY_CODE: dict[str, type[e.PaymentError]] = {
    "idempotency_key_in_use": e.IdempotencyInProgress,
    "idempotency_key_reused": e.IdempotencyMismatch,
    "payload_too_large": e.PayloadTooLarge,
    "insufficient_funds": e.InsufficientFunds,
    "resource_missing": e.NotFound,
    "region_unavailable": e.RegionUnavailable,
    "invalid_api_key": e.Unauthenticated,
    "forbidden": e.Forbidden,
    "rate_limited": e.RateLimited,
}
_BY_TYPE_AND_STATUS: dict[grpc.StatusCode, type[e.PaymentError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: e.InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: e.InsufficientFunds,
    grpc.StatusCode.NOT_FOUND: e.NotFound,
    grpc.StatusCode.ABORTED: e.Conflict,
    grpc.StatusCode.ALREADY_EXISTS: e.IdempotencyMismatch,
    grpc.StatusCode.RESOURCE_EXHAUSTED: e.PayloadTooLarge,
    grpc.StatusCode.UNAUTHENTICATED: e.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: e.Forbidden,
}


def status_for(exc: e.PaymentError) -> grpc.StatusCode:
    """The gRPC status code of a domain error."""
    for cls, code in _TO_GRPC:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def trailers_for(exc: e.PaymentError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that lets the caller rebuild the same error."""
    items = [("error-type", exc.type), ("error-code", exc.code)]
    if exc.param is not None:
        items.append(("error-param", exc.param))
    if isinstance(exc, e.RateLimited):
        items.append(("retry-after", f"{exc.retry_after:.3f}"))
    return tuple(items)


def from_rpc_error(err: grpc.aio.AioRpcError) -> e.PaymentError:
    """Rebuild the domain error a peer raised; transport failures become RegionUnavailable."""
    code = err.code()
    meta = {k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)}
    message = err.details() or code.name
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED) or "error-code" not in meta:
        if code in _BY_TYPE_AND_STATUS and "error-code" not in meta:
            return _BY_TYPE_AND_STATUS[code](message)
        return e.RegionUnavailable(f"Peer region unavailable: {message}")
    err_code = meta["error-code"]
    cls = _BY_CODE.get(err_code) or _BY_TYPE_AND_STATUS.get(code, e.PaymentError)
    if issubclass(cls, e.RateLimited):
        return cls(message, code=err_code, param=meta.get("error-param"),
                   retry_after=float(meta.get("retry-after", "1")))
    return cls(message, code=err_code, param=meta.get("error-param"))
