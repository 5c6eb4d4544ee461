"""Callback signatures: HMAC-SHA256 over `"<timestamp>.<body>"`, with a replay window.

Every callback carries

    Channel-Signature: t=<unix seconds>,v1=<hex hmac-sha256(secret, f"{t}.{body}")>

(the scheme of paycluster's own webhooks). A receiver recomputes the HMAC over the raw
body with the secret it shares with the channel, and accepts the callback only when a
`v1` matches and `t` is within the tolerance of its clock: a tampered body fails the
HMAC, a replayed old callback fails the window. Callbacks are also delivered at least
once (and the simulator duplicates some on purpose): receivers must still drop event ids
they have seen.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "Channel-Signature"
SCHEME = "v1"
DEFAULT_TOLERANCE_SECONDS = 300


class SignatureError(ValueError):
    """The header does not prove that this body came from the channel, recently."""


def compute(payload: bytes, secret: str, timestamp: int) -> str:
    """Hex HMAC-SHA256 of `"{timestamp}.{payload}"` keyed with `secret`."""
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The `Channel-Signature` header value for `payload`, signed now (or at `timestamp`)."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={ts},{SCHEME}={compute(payload, secret, ts)}"


def parse(header: str) -> tuple[int, list[str]]:
    """The timestamp and the `v1` signatures of a header; SignatureError if malformed.

    Unknown schemes are skipped, so receivers keep working if the channel adds one.
    """
    timestamp: int | None = None
    signatures: list[str] = []
    for item in (header or "").split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError("malformed signature header: expected key=value items")
        if key == "t":
            if timestamp is not None or not value.isdigit():
                raise SignatureError("malformed signature header: bad timestamp")
            timestamp = int(value)
        elif key == SCHEME:
            signatures.append(value)
    if timestamp is None:
        raise SignatureError("malformed signature header: no timestamp")
    if not signatures:
        raise SignatureError(f"malformed signature header: no {SCHEME} signature")
    return timestamp, signatures


def verify(payload: bytes, header: str, secret: str,
           tolerance: int = DEFAULT_TOLERANCE_SECONDS, now: float | None = None) -> int:
    """Check a callback; return its signing timestamp, or raise SignatureError.

    `payload` must be the raw body exactly as received (not re-serialized JSON). The
    timestamp must lie within `tolerance` seconds of `now` (default: the current time)
    and one `v1` must equal our HMAC; the comparison is constant-time.
    """
    timestamp, signatures = parse(header)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError(
            f"signature timestamp is {int(current - timestamp)} s away from now "
            f"(tolerance {tolerance} s): stale or replayed callback")
    expected = compute(payload, secret, timestamp).encode()
    matched = False
    for candidate in signatures:
        # No early exit: the time taken reveals nothing about which candidate matched.
        matched |= hmac.compare_digest(expected, candidate.encode())
    if not matched:
        raise SignatureError("no signature matches the body and this secret "
                             "(tampered body or wrong secret)")
    return timestamp
