"""Application-generated ids: UUIDv7, globally unique and time-ordered (no sequences)."""

from __future__ import annotations

import uuid

import uuid_utils


def new_id() -> uuid.UUID:
    """A fresh UUIDv7."""
    return uuid.UUID(bytes=uuid_utils.uuid7().bytes)


def parse_id(value: str) -> uuid.UUID | None:
    """Parse a client-supplied id; None when it is not a UUID."""
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return None
