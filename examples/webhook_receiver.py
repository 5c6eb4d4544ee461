"""A paycluster webhook receiver that needs only the Python standard library.

    WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py --port 8765

Register it with `POST /v1/webhook_endpoints {"url": "http://127.0.0.1:8765/hooks"}` and
put the `secret` of the response in WEBHOOK_SECRET. Every delivery carries

    Paycluster-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

with one `v1=` per valid secret (two while a rotated-out secret is still valid). Verify over
the RAW body (before any JSON parsing), reject stale timestamps (replays), and drop event
ids already processed: delivery is at least once. Answer 2xx when done; anything else is
retried with backoff.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

SIGNATURE_HEADER = "Paycluster-Signature"
TOLERANCE_SECONDS = 300


class SignatureError(ValueError):
    """The header does not prove that this body came from paycluster, recently."""


def verify(body: bytes, header: str, secret: str, tolerance: int = TOLERANCE_SECONDS,
           now: float | None = None) -> None:
    """Raise SignatureError unless one `v1` of `header` is the HMAC of `body` under
    `secret` and its timestamp is within `tolerance` seconds of `now`."""
    timestamp: int | None = None
    signatures: list[str] = []
    for item in (header or "").split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError("malformed signature header")
        if key == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value)
        # other schemes (a future v2=) are ignored
    if timestamp is None or not signatures:
        raise SignatureError("signature header needs t= and at least one v1=")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError("timestamp outside the tolerance (a replay?)")
    expected = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body,
                        hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, s) for s in signatures):
        raise SignatureError("no signature matches")


class Receiver(BaseHTTPRequestHandler):
    """Verifies, de-duplicates by event id, prints the event."""

    secret = ""
    seen: ClassVar[set[str]] = set()  # use a table with a unique key in a real receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            verify(body, self.headers.get(SIGNATURE_HEADER, ""), self.secret)
        except SignatureError as exc:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(str(exc).encode())
            return
        event = json.loads(body)
        if event["id"] not in self.seen:
            self.seen.add(event["id"])
            print(f"{event['type']} {event['data'].get('id')} from {event['region']}",
                  flush=True)
        self.send_response(204)
        self.end_headers()


def main() -> None:
    parser = argparse.ArgumentParser(description="paycluster webhook receiver (stdlib only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    Receiver.secret = os.environ["WEBHOOK_SECRET"]
    ThreadingHTTPServer((args.host, args.port), Receiver).serve_forever()


if __name__ == "__main__":
    main()
