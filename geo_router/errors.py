"""The router's own errors, in the cluster's one error shape
`{"error": {"type", "code", "message", "param"?}}`, so a client cannot tell (and need not
care) whether a node or the router refused its request. Bodies are built by the node's
`region_node.redact.error_body`, so the router masks card numbers and keys in what it
echoes by the very rule the nodes use."""

from __future__ import annotations

import json
from typing import Any

from region_node.redact import error_body


class RouterError(Exception):
    """An error the router answers itself, with its HTTP status."""

    def __init__(self, status: int, type_: str, code: str, message: str,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def to_body(self) -> dict[str, Any]:
        """The error shape, masked (messages echo client input: ids, headers, names)."""
        return error_body(self.type, self.code, self.message, self.param)

    def encode(self) -> bytes:
        """The error shape as a JSON body."""
        return json.dumps(self.to_body()).encode()


def invalid(message: str, code: str, param: str | None = None) -> RouterError:
    """400: the client sent something the router cannot use."""
    return RouterError(400, "invalid_request_error", code, message, param)


def unavailable(message: str, code: str, retry_after: int | None = 1) -> RouterError:
    """503: no region can take the request now."""
    headers = {"retry-after": str(retry_after)} if retry_after else {}
    return RouterError(503, "api_error", code, message, headers=headers)


def not_found(message: str, code: str = "resource_missing",
              param: str | None = None) -> RouterError:
    """404."""
    return RouterError(404, "invalid_request_error", code, message, param)
