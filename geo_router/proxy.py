"""The HTTP reverse proxy: a plain ASGI app that sends each request to the region the
policy chooses and relays the answer.

- Bodies stream both ways (never read whole, except small POST bodies that name the owner
  when owner preference is on, see `owners`, and answers of at most `WHOLE_ANSWER_BYTES`
  with a Content-Length, which are read whole before their status line is relayed: a
  region that dies in the middle of one is then a failed attempt, not a truncated answer).
  Response bytes are relayed raw: encodings and lengths stay as the node wrote them.
- Headers are kept, minus hop-by-hop ones (RFC 9110 7.6.1) and Host; added are
  `X-Forwarded-For` (appended), `X-Forwarded-Proto`, `X-Forwarded-Host`, an
  `x-request-id` (the client's, or a new one) and trace context as a service mesh would:
  a child span of the client's `traceparent` (or a new trace), with `b3` / `X-B3-*`
  carried on as a child span too when the client uses them.
- The answer says where it went: `Paycluster-Routed-To`, `Paycluster-Route-Reason`
  (owner, nearest, weighted, failover) and `Paycluster-Route-Attempts`, next to the
  node's own `Paycluster-Served-By` / `Paycluster-Owner`.
- Retries: when a region cannot be reached (connection refused or reset, or the
  connection died before an answer), a request that is safe to repeat - GET / HEAD /
  OPTIONS, or a mutation carrying `Idempotency-Key` - is sent to the next region of the
  decision; anything else gets a 503 in the error shape and is never sent twice (a 502
  `upstream_broken` if the region broke off its answer: it may have run there). A timeout
  waiting for the answer is not retried either (the request may still be running there):
  504. The request body is kept for a replay up to `retry_buffer_bytes`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping

import aiohttp
from multidict import CIMultiDict
from starlette.types import Receive, Scope, Send
from yarl import URL

from geo_router.errors import RouterError, unavailable
from geo_router.owners import SAFE_METHODS, body_names_owner, wants_owner
from geo_router.policy import Decision, NoRoute
from geo_router.service import RouterService
from region_node.tracing import TRACE_HEADERS, child_headers
from region_node.tracing import parse_traceparent as parse_traceparent

log = logging.getLogger("geo_router.proxy")

RawHeaders = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"proxy-connection", b"te", b"trailer",
                        b"trailers", b"transfer-encoding", b"upgrade"})
"""Headers that describe one connection, not the message: never forwarded."""

ROUTED_TO = b"paycluster-routed-to"
ROUTE_REASON = b"paycluster-route-reason"
ROUTE_ATTEMPTS = b"paycluster-route-attempts"
CLIENT_ID = b"x-client-id"
"""Optional stable client identity: the key of the hash that splits traffic by weight
(else the client's address, else the request id)."""

# Transport failures that mean "this region could not be reached, or the connection died
# before it answered": a safe request may go to the next region. (A connect timeout is a
# TimeoutError too, so it is named first where they are told apart.)
_UNREACHABLE = (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError,
                aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)

WHOLE_ANSWER_BYTES = 64 * 1024
"""Answers up to this size (all of the API's JSON) are read whole before they are relayed."""

# Headers the client library would add on its own: the client's own (or none) go upstream.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class ClientDisconnected(Exception):
    """The client went away while we were reading its request body."""


# ---------------------------------------------------------------------------- headers


def connection_headers(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Hop-by-hop header names of a message: the fixed ones plus those `Connection` lists."""
    named = {token.strip().lower() for name, value in headers if name.lower() == b"connection"
             for token in value.split(b",") if token.strip()}
    return HOP_BY_HOP | named


def trace_headers(headers: Mapping[bytes, bytes], span_id: str | None = None) -> RawHeaders:
    """The trace headers to send upstream, as a mesh sidecar would: this hop becomes a new
    span (`span_id`) in the client's trace - or the first span of a new trace. The rules
    (traceparent, tracestate, b3 / X-B3-*) are the nodes' own: region_node.tracing."""
    def get(name: str) -> str:
        return headers.get(name.encode(), b"").decode("latin-1")

    return [(name.encode(), value.encode("latin-1"))
            for name, value in child_headers(get, span_id)]


_TRACE_NAMES = frozenset(name.encode() for name in TRACE_HEADERS)


def upstream_headers(raw: RawHeaders, *, client_ip: str | None, scheme: str,
                     request_id: str, trust_forwarded: bool = False,
                     span_id: str | None = None) -> RawHeaders:
    """The request headers to send to a region (see the module docstring)."""
    drop = connection_headers(raw) | {b"host", b"x-request-id", b"x-forwarded-for",
                                      b"x-forwarded-proto", b"x-forwarded-host"} | _TRACE_NAMES
    first: dict[bytes, bytes] = {}
    for name, value in raw:
        first.setdefault(name.lower(), value)
    out = [(name, value) for name, value in raw if name.lower() not in drop]
    out.append((b"x-request-id", request_id.encode("latin-1")))
    prior = first.get(b"x-forwarded-for")
    if client_ip:
        out.append((b"x-forwarded-for",
                    (prior + b", " if prior else b"") + client_ip.encode("latin-1")))
    elif prior:
        out.append((b"x-forwarded-for", prior))
    proto = first.get(b"x-forwarded-proto") if trust_forwarded else None
    out.append((b"x-forwarded-proto", proto or scheme.encode()))
    host = (first.get(b"x-forwarded-host") if trust_forwarded else None) or first.get(b"host")
    if host:
        out.append((b"x-forwarded-host", host))
    out.extend(trace_headers(first, span_id))
    return out


def client_address(scope: Scope, headers: Mapping[bytes, bytes], trust_forwarded: bool
                   ) -> str | None:
    """The client's IP: the socket peer, or the first X-Forwarded-For hop when trusted."""
    if trust_forwarded and headers.get(b"x-forwarded-for"):
        return headers[b"x-forwarded-for"].split(b",")[0].strip().decode("latin-1")
    client = scope.get("client")
    return str(client[0]) if client else None


# ---------------------------------------------------------------------------- bodies


class BodySource:
    """The client's request body, read as it arrives, replayable while it fits `limit`.

    Chunks read ahead of sending (the first chunk, a peeked body) are always kept until
    they are sent. While streaming, chunks are kept as long as the total stays within
    `limit`, so that a safe request can be sent again to the next region; past it the kept
    ones are dropped and `replayable` turns False.
    """

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False
        self.replayable = True
        self.disconnected = False

    async def _pull(self, ahead: bool = False) -> bytes:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
            raise ClientDisconnected()
        chunk: bytes = message.get("body", b"")
        self.done = not message.get("more_body", False)
        self.size += len(chunk)
        if self.replayable:
            if ahead or self.size <= self.limit:
                self.chunks.append(chunk)
            else:
                # The stream that pulled this chunk has sent the kept ones already.
                self.replayable = False
                self.chunks = []
        return chunk

    async def read_upto(self, limit: int) -> bytes | None:
        """The whole body if it is at most `limit` bytes, else None (what was read is
        kept and sent first by `stream()`)."""
        while not self.done and self.size <= limit:
            await self._pull(ahead=True)
        return self.complete() if self.size <= limit else None

    async def prefetch(self) -> None:
        """Read the first chunk: most API bodies arrive in one, and are then sent as bytes
        instead of through a generator."""
        if not self.done and not self.size and not self.chunks:
            await self._pull(ahead=True)

    def complete(self) -> bytes | None:
        """The whole body, if it has all arrived and is kept."""
        return b"".join(self.chunks) if self.done and self.replayable else None

    async def stream(self) -> AsyncIterator[bytes]:
        """The body from its start: the kept chunks, then the rest as it arrives."""
        for chunk in list(self.chunks):
            yield chunk
        while not self.done:
            chunk = await self._pull()
            if chunk:
                yield chunk


# ---------------------------------------------------------------------------- the proxy


async def send_error(send: Send, err: RouterError, request_id: str,
                     extra: RawHeaders | None = None) -> None:
    """Answer with a router error in the error shape."""
    body = err.encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()),
               (b"x-request-id", request_id.encode("latin-1")),
               *((k.encode(), v.encode()) for k, v in err.headers.items()), *(extra or [])]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Proxy:
    """ASGI app of the public listener: `/v1/resolve` is answered here, everything else
    is proxied to a region."""

    def __init__(self, service: RouterService,
                 resolve: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None
                 ) -> None:
        self.service = service
        self.resolve = resolve
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The upstream connection pool (created on first use, inside the event loop).

        aiohttp rather than httpx for the hot path: its C HTTP parser makes the router's
        own share of a request about half (see bench/router.py). No cookie jar - a proxy
        must never carry one client's cookies to another - and no decompression: bytes are
        relayed as the node encoded them.
        """
        if self._session is None:
            s = self.service.settings
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=s.max_connections, limit_per_host=0,
                                               use_dns_cache=False),
                timeout=aiohttp.ClientTimeout(total=s.upstream_timeout_seconds,
                                              sock_connect=s.connect_timeout_seconds,
                                              sock_read=s.upstream_timeout_seconds),
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trust_env=False,
                skip_auto_headers=_NO_AUTO_HEADERS)
        return self._session

    async def aclose(self) -> None:
        """Close the upstream connection pool."""
        if self._session is not None:
            await self._session.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets in the API
        if scope["path"] == "/v1/resolve" and self.resolve is not None:
            await self.resolve(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route one request and relay the answer."""
        started = time.perf_counter()
        service, settings, metrics = self.service, self.service.settings, self.service.metrics
        method: str = scope["method"]
        raw: RawHeaders = scope["headers"]
        first: dict[bytes, bytes] = {}
        for name, value in raw:
            first.setdefault(name, value)
        request_id = (first.get(b"x-request-id", b"").decode("latin-1")[:128]
                      or uuid.uuid4().hex)
        client_ip = client_address(scope, first, settings.trust_forwarded_for)
        safe = method in SAFE_METHODS or b"idempotency-key" in first
        length = first.get(b"content-length")
        has_body = (b"transfer-encoding" in first
                    or (length is not None and length.strip() not in (b"", b"0")))
        peek = (settings.owner_peek_bytes if settings.prefer_owner
                and body_names_owner(method, scope["path"]) and length is not None
                and length.strip().isdigit() and int(length) <= settings.owner_peek_bytes
                else 0)
        body = BodySource(receive, max(settings.retry_buffer_bytes if safe else 0, peek))
        try:
            location = service.locate(_text(first.get(b"x-client-region")),
                                      _text(first.get(b"x-client-geo")), client_ip)
            home = None
            if settings.prefer_owner and wants_owner(method, scope.get("query_string", b"")):
                home = service.homes.home_in_path(scope["path"])
                if home is None and peek:
                    data = await body.read_upto(peek)
                    home = service.homes.home_in_body(scope["path"], data or b"")
            key = (_text(first.get(CLIENT_ID)) or client_ip or request_id)
            decision = service.decide(location, key, home)
        except RouterError as err:
            metrics.requests.labels("none", method, str(err.status)).inc()
            await send_error(send, err, request_id)
            return
        except NoRoute as exc:
            metrics.no_route.inc()
            metrics.requests.labels("none", method, "503").inc()
            await send_error(send, unavailable(str(exc), "no_healthy_region"), request_id)
            return
        except ClientDisconnected:
            return
        metrics.decisions.labels(decision.region, decision.reason).inc()
        headers = upstream_headers(raw, client_ip=client_ip, scheme=scope.get("scheme", "http"),
                                   request_id=request_id,
                                   trust_forwarded=settings.trust_forwarded_for)
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        path = target.decode("latin-1")
        upstream = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers)
        regions = decision.order[:settings.max_attempts] if safe else decision.order[:1]
        failure = ""
        attempt = 0
        for attempt, region in enumerate(regions, start=1):
            if attempt > 1:
                if body.disconnected:
                    return
                if not body.replayable:
                    metrics.not_retried.labels(regions[attempt - 2]).inc()
                    failure += "; not retried: the body is too large to replay"
                    break
                metrics.failovers.labels(regions[attempt - 2], region).inc()
            try:
                if has_body:
                    await body.prefetch()
                whole = body.complete() if has_body else None
                content: bytes | AsyncIterator[bytes] | None = (
                    whole if whole is not None else body.stream() if has_body else None)
                # encoded=True: the path goes upstream byte for byte, not re-normalised.
                response = await self.session().request(
                    method, URL(service.endpoint(region) + path, encoded=True),
                    headers=upstream, data=content, allow_redirects=False)
            except ClientDisconnected:
                return
            except _UNREACHABLE as exc:
                if body.disconnected:  # the body writer failed because the client left
                    return
                metrics.attempts.labels(region, "connect_error").inc()
                failure += f"{'; ' if failure else ''}{region}: {_describe(exc)}"
                log.warning("region %s unreachable for %s %s: %s", region, method,
                            scope["path"], _describe(exc),
                            extra={"event": "upstream_unreachable", "region": region,
                                   "request_id": request_id})
                continue
            except (TimeoutError, aiohttp.ClientError) as exc:
                # A read timeout, or an answer that is not HTTP: the request may have run
                # there, so it is not sent anywhere else.
                timeout = isinstance(exc, TimeoutError)
                metrics.attempts.labels(region, "timeout" if timeout else "bad_answer").inc()
                answer = RouterError(
                    504, "api_error", "upstream_timeout",
                    f"Region {region} did not answer in time; the request may still complete "
                    "there - retry with the same Idempotency-Key to find out") if timeout \
                    else RouterError(502, "api_error", "bad_gateway",
                                     f"Region {region} sent an invalid answer: {_describe(exc)}")
                metrics.requests.labels(region, method, str(answer.status)).inc()
                await send_error(send, answer, request_id,
                                 self._route_headers(decision, region, attempt))
                return
            whole_answer: bytes | None = None
            if (response.content_length is not None
                    and response.content_length <= WHOLE_ANSWER_BYTES):
                try:
                    whole_answer = await response.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # The region died (or cut us off) in the middle of its answer: nothing
                    # reached the client yet, so this is a failed attempt like a reset.
                    response.release()
                    metrics.attempts.labels(region, "broken_answer").inc()
                    broken = f"answered {response.status}, then broke off ({_describe(exc)})"
                    failure += f"{'; ' if failure else ''}{region}: {broken}"
                    log.warning("region %s %s for %s %s", region, broken, method,
                                scope["path"], extra={"event": "upstream_broken",
                                                      "region": region,
                                                      "request_id": request_id})
                    if safe:
                        continue
                    metrics.not_retried.labels(region).inc()
                    metrics.requests.labels(region, method, "502").inc()
                    await send_error(send, RouterError(
                        502, "api_error", "upstream_broken",
                        f"Region {region} {broken}. The request was not retried on another "
                        "region because it is not safe to repeat, and it may have run there: "
                        "retry it with an Idempotency-Key."), request_id,
                        self._route_headers(decision, region, attempt))
                    return
            metrics.attempts.labels(region, "response").inc()
            await self._relay(response, send, decision, region, attempt, request_id, method,
                              started, whole_answer)
            return
        # Nothing answered.
        if not safe:
            metrics.not_retried.labels(regions[0]).inc()
            message = (f"Region {regions[0]} could not be reached ({failure}). The request was "
                       "not retried on another region because it is not safe to repeat: "
                       "only GET requests and requests carrying an Idempotency-Key are. "
                       "Retry it with an Idempotency-Key.")
        else:
            message = f"No region could be reached: {failure}"
        metrics.requests.labels("none", method, "503").inc()
        await send_error(send, unavailable(message, "upstream_unavailable"), request_id,
                         self._route_headers(decision, regions[attempt - 1], attempt))

    @staticmethod
    def _route_headers(decision: Decision, region: str, attempts: int) -> RawHeaders:
        return [(ROUTED_TO, region.encode()), (ROUTE_REASON, (
            "failover" if attempts > 1 else decision.reason).encode()),
            (ROUTE_ATTEMPTS, str(attempts).encode())]

    async def _relay(self, response: aiohttp.ClientResponse, send: Send, decision: Decision,
                     region: str, attempts: int, request_id: str, method: str,
                     started: float, whole_answer: bytes | None = None) -> None:
        metrics = self.service.metrics
        raw = response.raw_headers
        drop = connection_headers(raw)
        headers = [(k.lower(), v) for k, v in raw if k.lower() not in drop]
        if not any(k == b"x-request-id" for k, _ in headers):
            headers.append((b"x-request-id", request_id.encode("latin-1")))
        headers.extend(self._route_headers(decision, region, attempts))
        metrics.requests.labels(region, method, str(response.status)).inc()
        metrics.request_seconds.labels(region).observe(time.perf_counter() - started)
        if self.service.settings.access_log:
            log.info("%s -> %s %d", method, region, response.status,
                     extra={"event": "request", "region": region, "request_id": request_id,
                            "status": response.status, "reason": decision.reason})
        try:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": headers})
            if whole_answer is not None:
                await send({"type": "http.response.body", "body": whole_answer,
                            "more_body": False})
                return
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The status line is gone already: all we can do is cut the response short so
            # the client sees a broken message, not a complete-looking truncated one.
            log.warning("region %s broke off its answer: %s", region, _describe(exc),
                        extra={"event": "upstream_broken", "region": region,
                               "request_id": request_id})
            response.close()
            raise
        finally:
            response.release()


def _text(value: bytes | None) -> str | None:
    return (value.decode("latin-1").strip() or None) if value else None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__

