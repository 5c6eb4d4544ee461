"""Structured logs: one JSON object per line, with region and request id."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

from region_node.redact import scrub, scrub_value

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


# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class RedactFilter(logging.Filter):
    """Scrubs every record before any formatter sees it: no API key, webhook secret or
    full card number reaches a log line (region_node/redact.py).

    The message is rendered (msg % args) and scrubbed, the traceback rendered into
    `exc_text` and scrubbed, and every string in `extra=` fields scrubbed. Installed on
    the handlers (a filter on the root logger would not see child loggers' records).
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: log what we have, scrubbed
            message = f"{record.msg!s} {record.args!r}"
        clean = scrub(message, keep_labelled_ids=True)
        if clean != message:
            # Rendered once, scrubbed; formatters that need the args (uvicorn's access
            # formatter) only run where nothing had to be hidden.
            record.msg = clean
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str | dict | list | tuple):
                setattr(record, key, scrub_value(value))
        return True


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
