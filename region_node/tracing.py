"""Trace context across hops, in the formats a service mesh (Istio/Envoy) stitches:
`x-request-id`, W3C `traceparent` / `tracestate`, and Zipkin B3 (`b3` or `x-b3-*`).

Each hop (a router's proxy, a node's request, a node's gRPC call from a peer) becomes a new
span of the caller's trace: the trace id is kept, this hop gets its own span id, and the
caller's span becomes the parent. `tracestate` and the B3 sampling decision pass through
untouched. B3 headers are only sent on when the caller used them (a mesh that speaks B3
sends them; nobody else needs them).

`child_headers` computes the headers for the next hop from the incoming ones; the node
keeps them for the current request in `propagated` (next to region_node.logs.traceparent,
which its log lines carry) and `region_node.rpc.client.call_metadata` sends them on.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from contextvars import ContextVar

TRACE_HEADERS: tuple[str, ...] = (
    "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
    "x-b3-sampled", "x-b3-flags")
"""Every trace header, lower case (a hop replaces all of them with its own)."""

propagated: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("trace_propagated",
                                                                 default=())
"""`tracestate` and B3 headers of the current request's span, to send on every call it
makes (traceparent lives in region_node.logs.traceparent)."""


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text) \
        and text.strip("0") != ""


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace id, parent span id, flags) of a valid W3C traceparent, else None."""
    if not value:
        return None
    parts = value.strip().lower().split("-")
    if len(parts) < 4 or parts[0] == "ff" or len(parts[0]) != 2:
        return None
    if not (_is_hex(parts[1], 32) and _is_hex(parts[2], 16) and len(parts[3]) == 2):
        return None
    return parts[1], parts[2], parts[3]


def child_headers(get: Callable[[str], str | None], span_id: str | None = None
                  ) -> list[tuple[str, str]]:
    """The trace headers of a new span (`span_id`, else a random one) under the caller's,
    whose headers `get(name)` returns (lower-case names; None or "" when absent).

    - `traceparent`: the caller's trace id and flags; if the caller only sent B3, the
      trace id comes from B3 so both formats name the same trace; else a new sampled trace.
    - `tracestate`: passed on unchanged (W3C: a hop that does not own an entry keeps it).
    - `b3` (single header) and `x-b3-*`: this span as span id, the caller's as parent,
      trace id and sampling kept; only if the caller sent them.
    """
    span = span_id or secrets.token_hex(8)

    def value(name: str) -> str:
        return (get(name) or "").strip()

    out: list[tuple[str, str]] = []
    b3_single = value("b3")
    b3_parts = b3_single.split("-") if b3_single and b3_single not in ("0", "1", "d") else []
    b3_trace = (b3_parts[0] if len(b3_parts) >= 2 else value("x-b3-traceid")).lower()
    parent = parse_traceparent(value("traceparent"))
    if parent is not None:
        trace, _, flags = parent
    elif (b3_trace and all(c in "0123456789abcdef" for c in b3_trace)
          and len(b3_trace) in (16, 32)):
        trace, flags = b3_trace.rjust(32, "0"), "01"
    else:
        trace, flags = secrets.token_hex(16), "01"
    out.append(("traceparent", f"00-{trace}-{span}-{flags}"))
    if value("tracestate"):
        out.append(("tracestate", value("tracestate")))
    if len(b3_parts) >= 2:
        sampled = b3_parts[2] if len(b3_parts) >= 3 else ""
        out.append(("b3", f"{b3_parts[0]}-{span}" + (f"-{sampled}" if sampled else "")
                    + f"-{b3_parts[1]}"))
    elif b3_single:
        out.append(("b3", b3_single))  # a bare sampling decision ("0", "1", "d")
    if value("x-b3-traceid"):
        out.append(("x-b3-traceid", value("x-b3-traceid")))
        out.append(("x-b3-spanid", span))
        if value("x-b3-spanid"):
            out.append(("x-b3-parentspanid", value("x-b3-spanid")))
        for name in ("x-b3-sampled", "x-b3-flags"):
            if value(name):
                out.append((name, value(name)))
    return out


def enter(get: Callable[[str], str | None]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """This hop's span under the caller's: its traceparent, and the other trace headers
    (tracestate, B3) that calls made while serving it carry on."""
    headers = child_headers(get)
    return headers[0][1], tuple(headers[1:])
