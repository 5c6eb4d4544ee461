"""Webhook signatures, Stripe-style.

Every delivery carries

    Paycluster-Signature: t=<unix seconds>,v1=<hex hmac-sha256(secret, f"{t}.{body}")>

with one `v1=` per secret that is active for the endpoint (two while a rotated-out secret
is still valid). A receiver recomputes the HMAC over the raw body it received with its
secret and accepts the request when any `v1` matches and `t` is recent, which defeats
both tampering and replays of old requests.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as _secrets
import string
import time
from collections.abc import Iterable

SIGNATURE_HEADER = "Paycluster-Signature"
SCHEME = "v1"
DEFAULT_TOLERANCE_SECONDS = 300
SECRET_PREFIX = "whsec_"
_SECRET_ALPHABET = string.ascii_letters + string.digits
_SECRET_LENGTH = 40


class SignatureError(ValueError):
    """The signature header does not prove that the body came from paycluster, now."""


def new_secret() -> str:
    """A fresh endpoint secret: `whsec_` and 40 random letters and digits (~238 bits)."""
    return SECRET_PREFIX + "".join(_secrets.choice(_SECRET_ALPHABET)
                                   for _ in range(_SECRET_LENGTH))


def compute(payload: bytes, secret: str, timestamp: int) -> str:
    """Hex HMAC-SHA256 of `"{timestamp}.{payload}"` keyed with `secret`."""
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(payload: bytes, secrets: Iterable[str], timestamp: int | None = None) -> str:
    """The `Paycluster-Signature` header value: `t=<ts>` and one `v1=` per secret."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    parts = [f"t={ts}"] + [f"{SCHEME}={compute(payload, s, ts)}" for s in secrets]
    if len(parts) == 1:
        raise ValueError("at least one secret is needed to sign")
    return ",".join(parts)


def parse(header: str) -> tuple[int, list[str]]:
    """Split a header into its timestamp and its `v1` signatures; SignatureError if malformed.

    Unknown schemes (e.g. a future `v2=`) are ignored, so receivers keep working while
    the sender adds one.
    """
    timestamp: int | None = None
    signatures: list[str] = []
    for item in (header or "").split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError("malformed signature header: expected key=value items")
        if key == "t":
            if timestamp is not None or not (value.isascii() and value.isdigit()):
                raise SignatureError("malformed signature header: bad timestamp")
            timestamp = int(value)
        elif key == SCHEME:
            signatures.append(value)
    if timestamp is None:
        raise SignatureError("malformed signature header: no timestamp")
    if not signatures:
        raise SignatureError(f"malformed signature header: no {SCHEME} signature")
    return timestamp, signatures


def verify(payload: bytes, header: str, secret: str, tolerance: int = DEFAULT_TOLERANCE_SECONDS,
           now: float | None = None) -> None:
    """Check a webhook request; returns None when it is genuine, raises SignatureError if not.

    `payload` must be the raw request body exactly as received (not re-serialized JSON),
    `header` the `Paycluster-Signature` value and `secret` the endpoint's `whsec_...`.
    The request is accepted when its timestamp is within `tolerance` seconds of `now`
    (default: the current time) and any of its `v1` signatures equals the HMAC we
    compute; the comparison is constant-time (`hmac.compare_digest`). Several `v1`
    values are normal during a secret rotation. Receivers should also drop events whose
    `id` they have already processed: delivery is at least once.
    """
    timestamp, signatures = parse(header)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError(
            f"signature timestamp is {int(current - timestamp)} s away from now "
            f"(tolerance {tolerance} s): stale or replayed request")
    expected = compute(payload, secret, timestamp)
    # Compare against every candidate without stopping early, so timing reveals nothing.
    matched = False
    for candidate in signatures:
        matched |= hmac.compare_digest(expected.encode(), candidate.encode())
    if not matched:
        raise SignatureError("no signature matches the body and this secret "
                             "(tampered body or wrong secret)")
