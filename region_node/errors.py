"""The domain error hierarchy. Mapped once to HTTP (api/errors.py) and once to gRPC."""

from __future__ import annotations

from region_node.redact import error_body


class PaymentError(Exception):
    """Base of every error a client may see. `type` and `code` are stable identifiers."""

    http_status = 500
    type = "api_error"
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    def to_body(self) -> dict[str, dict[str, str]]:
        """The one error shape, masked (`redact.error_body`, shared with the geo router)."""
        return error_body(self.type, self.code, self.message, self.param)


class InvalidRequest(PaymentError):
    """The request is malformed or violates a rule that does not depend on state."""

    http_status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    """Body larger than the configured maximum."""

    http_status = 413
    code = "payload_too_large"


class Unauthenticated(PaymentError):
    """No API key, or one that is unknown or revoked (401)."""

    http_status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(PaymentError):
    """The caller's key is valid but may not touch this resource or route (403)."""

    http_status = 403
    type = "permission_error"
    code = "forbidden"


class RateLimited(PaymentError):
    """The caller's key is over its rate limit (429); retry after `retry_after` seconds."""

    http_status = 429
    type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message, code=code, param=param)
        self.retry_after = retry_after


class InsufficientFunds(PaymentError):
    """The payer's available balance does not cover the amount."""

    http_status = 402
    type = "payment_error"
    code = "insufficient_funds"


class NotFound(PaymentError):
    """No such resource."""

    http_status = 404
    type = "invalid_request_error"
    code = "resource_missing"


class Conflict(PaymentError):
    """The resource's state does not allow the operation (or a concurrent request holds it)."""

    http_status = 409
    type = "invalid_request_error"
    code = "state_conflict"


class IdempotencyInProgress(Conflict):
    """Same Idempotency-Key while the first request is still running."""

    code = "idempotency_key_in_use"


class IdempotencyMismatch(PaymentError):
    """Same Idempotency-Key with a different request body."""

    http_status = 422
    type = "idempotency_error"
    code = "idempotency_key_reused"


class RegionUnavailable(PaymentError):
    """A store, or the region that owns the data, cannot be reached right now."""

    http_status = 503
    type = "api_error"
    code = "region_unavailable"
