"""Domain errors mapped once to gRPC status codes, and back.

The caller gets the exact domain error back: its class, code, message, param, type and
HTTP status travel with the status (message as details, the rest in trailing metadata),
so a request forwarded to another region fails exactly as it would have failed locally.
That matters most for the 503s: `not_owner`, `lease_lost` and `ownership_handover` tell a
client (and the router, and the drill workload) to retry elsewhere or shortly, which a
generic `region_unavailable` does not. Only a call the peer never answered (no error
trailers: connection refused, deadline, cancelled) becomes `region_unavailable`.
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

# A status without our trailers (a peer of an older version, or grpc itself) is read as
# the most general class that status stands for.
_BY_STATUS: dict[grpc.StatusCode, type[e.PaymentError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: e.InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: e.InsufficientFunds,
    grpc.StatusCode.NOT_FOUND: e.NotFound,
    grpc.StatusCode.ABORTED: e.Conflict,
    grpc.StatusCode.ALREADY_EXISTS: e.IdempotencyMismatch,
    grpc.StatusCode.RESOURCE_EXHAUSTED: e.PayloadTooLarge,
    grpc.StatusCode.UNAUTHENTICATED: e.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: e.Forbidden,
    grpc.StatusCode.UNAVAILABLE: e.RegionUnavailable,
}

# Statuses grpc raises by itself when the peer never answered.
_TRANSPORT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED)


def _hierarchy() -> dict[str, type[e.PaymentError]]:
    """Every class of region_node/errors.py by name: the trailer `error-class` names one."""
    found: dict[str, type[e.PaymentError]] = {}
    todo: list[type[e.PaymentError]] = [e.PaymentError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == e.__name__:
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


_CLASSES = _hierarchy()


def status_for(exc: e.PaymentError) -> grpc.StatusCode:
    """The gRPC status code of a domain error."""
    for cls, code in _TO_GRPC:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def trailers_for(exc: e.PaymentError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that lets the caller rebuild the same error."""
    items = [("error-class", type(exc).__name__), ("error-type", exc.type),
             ("error-code", exc.code), ("error-status", str(exc.http_status))]
    if exc.param is not None:
        items.append(("error-param", exc.param))
    if isinstance(exc, e.RateLimited):
        items.append(("retry-after", f"{exc.retry_after:.3f}"))
    return tuple(items)


def from_rpc_error(err: grpc.aio.AioRpcError) -> e.PaymentError:
    """Rebuild the domain error a peer raised; transport failures become RegionUnavailable."""
    status = err.code()
    meta = {k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)}
    message = err.details() or status.name
    if "error-code" not in meta:
        if status in _TRANSPORT:
            return e.RegionUnavailable(f"Peer region unavailable: {message}")
        return _BY_STATUS.get(status, e.PaymentError)(message)
    cls = _CLASSES.get(meta.get("error-class", "")) or _BY_STATUS.get(status, e.PaymentError)
    code, param = meta["error-code"], meta.get("error-param")
    exc = (cls(message, code=code, param=param,
               retry_after=float(meta.get("retry-after", "1")))
           if issubclass(cls, e.RateLimited) else cls(message, code=code, param=param))
    # A class's type and status are its defaults; an instance may carry others (the
    # framework errors of api/errors.py), and the peer's word wins.
    if meta.get("error-type") and meta["error-type"] != exc.type:
        exc.type = meta["error-type"]
    raw_status = meta.get("error-status", "")
    if raw_status.isdigit() and int(raw_status) != exc.http_status:
        exc.http_status = int(raw_status)
    return exc
