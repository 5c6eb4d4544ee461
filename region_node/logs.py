"""Structured logs: one JSON object per line, with region and request id."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

# RedactFilter lives with the masking rule it applies, where the geo router (which may
# use only the node's published contracts) takes it too; imported here for the node.
from region_node.redact import RedactFilter as RedactFilter
from region_node.redact import scrub

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
traceparent: ContextVar[str | None] = ContextVar("traceparent", default=None)
"""W3C trace context of the current request's span (region_node.tracing makes it), passed
on to every call to another region."""


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
        # exc_text first: the redaction filter leaves the scrubbed traceback there.
        if record.exc_text:
            entry["exc"] = record.exc_text
        elif record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def install_redaction(handlers: list[logging.Handler] | None = None) -> None:
    """Add the RedactFilter to `handlers` (default: every handler of the root logger)."""
    for handler in logging.getLogger().handlers if handlers is None else handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())


def setup(region: str, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route the root logger to `stream` (default stderr) as JSON lines, scrubbed of keys,
    secrets and card numbers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(region))
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "httpx", "httpcore", "nats"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
