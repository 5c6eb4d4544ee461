"""Structured logs: one JSON object per line, with region and request id."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
traceparent: ContextVar[str | None] = ContextVar("traceparent", default=None)
"""W3C trace context of the current request, passed on to every call to another region."""


def new_traceparent(parent: str | None = None) -> str:
    """A W3C traceparent for this hop: same trace id as `parent` (if well formed), new span."""
    import secrets

    parts = (parent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return f"00-{parts[1]}-{secrets.token_hex(8)}-{parts[3]}"
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


class JsonFormatter(logging.Formatter):
    """Formats records as single-line JSON; never includes request bodies."""

    def __init__(self, region: str) -> None:
        super().__init__()
        self.region = region

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line."""
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(), "logger": record.name,
            "region": self.region, "request_id": request_id.get(),
            "traceparent": traceparent.get(), "msg": record.getMessage(),
        }
        for key in ("event", "method", "path", "status", "duration_ms"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(region: str, level: str = "INFO") -> None:
    """Route the root logger to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(region))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "httpx", "httpcore", "nats"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
