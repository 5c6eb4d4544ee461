"""Trace headers a service mesh (Istio) stitches, end to end: a client's request through
the geo router to us-east, forwarded by us-east to the payer's owner eu-west over gRPC,
and eu-west's push of the cross-region transfer back to us-east (the payee's region).

What each hop sends is observed on the wire, not inside the code: the router's request
as us-east's HTTP server receives it, and both gRPC calls through a pass-through gRPC
proxy ("tap") placed between the regions, presenting the certificates a mesh sidecar
would. Every hop must carry the client's request id, the same trace (W3C and B3), the
client's tracestate, and name the previous hop's span as its parent.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.servers import RegionServers, free_port, spawn, stop_pid
from region_node.__main__ import KEEP_ALIVE_SECONDS
from region_node.app import create_app
from region_node.config import RegionSettings
from region_node.rpc.tls import RpcTls
from region_node.tracing import parse_traceparent
from tests.conftest import admin_key, auth_headers, fresh_database, pki_files, region_settings

pytestmark = [pytest.mark.integration, pytest.mark.multiregion]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
REQUEST_ID = "req-trace-e2e-1"


class Recorder:
    """ASGI wrapper that keeps the headers of every HTTP request the node receives."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.requests.append((scope["path"], {k.decode().lower(): v.decode("latin-1")
                                                  for k, v in scope["headers"]}))
        await self.app(scope, receive, send)


@dataclass
class Tap:
    """A pass-through gRPC proxy from region `src` to region `dst`: presents `dst`'s
    certificate to `src`, `src`'s to `dst`, and records each call's method and metadata."""

    src: str
    dst: str
    upstream: str
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0
    _server: grpc.aio.Server | None = None
    _channel: grpc.aio.Channel | None = None

    async def start(self, servers: RegionServers) -> None:
        dst_files, src_files = pki_files(servers, self.dst), pki_files(servers, self.src)
        as_dst = RpcTls.from_files(dst_files.ca_file, dst_files.cert_file, dst_files.key_file)
        as_src = RpcTls.from_files(src_files.ca_file, src_files.cert_file, src_files.key_file)
        self._channel = grpc.aio.secure_channel(self.upstream, as_src.channel_credentials(),
                                                options=as_src.channel_options(self.dst))
        tap = self

        class Relay(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
                method = details.method  # type: ignore[attr-defined]
                meta = {k: v for k, v in details.invocation_metadata  # type: ignore[attr-defined]
                        if isinstance(v, str)}
                tap.calls.append((method, meta))
                sent = [(k, v) for k, v in meta.items()
                        if not k.startswith((":", "grpc-")) and k != "user-agent"]

                async def relay(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                    assert tap._channel is not None
                    call = tap._channel.unary_unary(method)
                    try:
                        reply: bytes = await call(request, metadata=sent, timeout=10)
                    except grpc.aio.AioRpcError as err:
                        await context.abort(err.code(), err.details() or "",
                                            err.trailing_metadata() or ())
                        raise
                    return reply

                return grpc.unary_unary_rpc_method_handler(relay)

        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((Relay(),))
        self.port = self._server.add_secure_port(f"127.0.0.1:{free_port()}",
                                                 as_dst.server_credentials())
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1)
        if self._channel is not None:
            await self._channel.close()

    def of(self, method: str) -> list[dict[str, str]]:
        return [meta for name, meta in self.calls if name.endswith(f"/{method}")]


@asynccontextmanager
async def served(settings: RegionSettings, app: ASGIApp) -> AsyncIterator[None]:
    """The node's app (lifespan and gRPC server included) on a real HTTP port."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.api_port,
                                           log_config=None, lifespan="on",
                                           timeout_keep_alive=KEEP_ALIVE_SECONDS))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "node did not start"
            await asyncio.sleep(0.05)
        yield
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


@asynccontextmanager
async def router(tmp: Any, catalog: list[dict[str, Any]]) -> AsyncIterator[str]:
    """`python -m geo_router` on 127.0.0.1 (its own process, stopped by pid)."""
    log = tmp / "router.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PAYCLUSTER_ROUTER_CATALOG": json.dumps(catalog),
           "PAYCLUSTER_ROUTER_PORT": "0", "PAYCLUSTER_ROUTER_ADMIN_PORT": "0",
           "PAYCLUSTER_ROUTER_DEFAULT_LOCATION": "us-east",
           # Nearest region first (us-east), not the payer's owner: the request must be
           # forwarded between the regions.
           "PAYCLUSTER_ROUTER_PREFER_OWNER": "false",
           "PAYCLUSTER_ROUTER_API_KEY": admin_key(),
           "PAYCLUSTER_ROUTER_PROBE_INTERVAL_SECONDS": "1.0",
           "PAYCLUSTER_ROUTER_PROBE_TIMEOUT_SECONDS": "1.0"}
    proc = spawn([sys.executable, "-m", "geo_router"], log, cwd=tmp, env=env)
    try:
        deadline = time.monotonic() + 30
        ready: dict[str, Any] | None = None
        while ready is None:
            for line in log.read_text().splitlines():
                if line.startswith("{") and '"router_url"' in line:
                    ready = json.loads(line)
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        # Routable once its probes found every region up (a loaded machine may need a
        # few rounds: fall/rise hysteresis).
        async with httpx.AsyncClient(base_url=ready["admin_url"]) as admin:
            while True:
                states = {r["name"]: r["state"] for r in
                          (await admin.get("/admin/regions")).json()["regions"]}
                if set(states.values()) <= {"healthy", "degraded"}:
                    break
                assert time.monotonic() < deadline + 30, states
                await asyncio.sleep(0.2)
        yield str(ready["router_url"])
    finally:
        stop_pid(proc.pid)
        proc.wait(10)


def _span(traceparent: str) -> str:
    parsed = parse_traceparent(traceparent)
    assert parsed is not None, traceparent
    assert parsed[0] == TRACE_ID, f"another trace: {traceparent}"
    return parsed[1]


def _assert_hop(headers: dict[str, str], parent_span: str) -> str:
    """The hop's headers continue the client's trace under `parent_span`; returns its span."""
    assert headers["x-request-id"] == REQUEST_ID
    span = _span(headers["traceparent"])
    assert span != parent_span
    assert headers["tracestate"] == "vendor=abc,other=1"
    assert headers["x-b3-traceid"] == TRACE_ID
    assert headers["x-b3-spanid"] == span, "B3 and W3C name the same span"
    assert headers["x-b3-parentspanid"] == parent_span
    assert headers["x-b3-sampled"] == "1"
    return span


async def test_trace_headers_through_router_forward_and_transfer(
        servers: RegionServers, tmp_path: Any) -> None:
    api = {"us-east": free_port(), "eu-west": free_port()}
    rpc = {"us-east": free_port(), "eu-west": free_port()}
    to_eu = Tap("us-east", "eu-west", f"127.0.0.1:{rpc['eu-west']}")
    to_us = Tap("eu-west", "us-east", f"127.0.0.1:{rpc['us-east']}")
    await to_eu.start(servers)
    await to_us.start(servers)
    try:
        with fresh_database(servers) as db_us, fresh_database(servers) as db_eu:
            def settings(region: str, db: str, peer: str, tap: Tap) -> RegionSettings:
                files = pki_files(servers, region)
                return region_settings(
                    servers, db, region=region, api_port=api[region], grpc_port=rpc[region],
                    peers={peer: f"127.0.0.1:{tap.port}"}, transfer_poll_seconds=5.0,
                    tls_ca_file=str(files.ca_file), tls_cert_file=str(files.cert_file),
                    tls_key_file=str(files.key_file))

            s_us = settings("us-east", db_us, "eu-west", to_eu)
            s_eu = settings("eu-west", db_eu, "us-east", to_us)
            us_ingress = Recorder(create_app(s_us))
            async with served(s_us, us_ingress), served(s_eu, create_app(s_eu)):
                us, eu = (httpx.AsyncClient(base_url=f"http://127.0.0.1:{api[r]}",
                                            headers=auth_headers())
                          for r in ("us-east", "eu-west"))
                async with us, eu:
                    payer = (await eu.post("/v1/accounts", json={"currency": "EUR"})).json()
                    await eu.post(f"/v1/accounts/{payer['id']}/deposits",
                                  json={"amount": 10_000})
                    payee = (await us.post("/v1/accounts", json={"currency": "EUR"})).json()
                    catalog = [{"name": r, "endpoint": f"http://127.0.0.1:{api[r]}"}
                               for r in ("us-east", "eu-west")]
                    async with router(tmp_path, catalog) as router_url, httpx.AsyncClient(
                            base_url=router_url, headers=auth_headers(), timeout=20) as client:
                        resp = await client.post("/v1/payments", json={
                            "payer": payer["id"], "payee": payee["id"], "amount": 1_500,
                            "currency": "EUR"}, headers={
                            "x-client-region": "us-east", "x-request-id": REQUEST_ID,
                            "traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01",
                            "tracestate": "vendor=abc,other=1",
                            "x-b3-traceid": TRACE_ID, "x-b3-spanid": CLIENT_SPAN,
                            "x-b3-sampled": "1"})
                        assert resp.status_code == 201, resp.text
                        assert resp.headers["paycluster-routed-to"] == "us-east"
                        assert resp.headers["paycluster-served-by"] == "eu-west"
                        assert resp.headers["x-request-id"] == REQUEST_ID
                        deadline = time.monotonic() + 15
                        while not to_us.of("ApplyTransfer"):
                            assert time.monotonic() < deadline, "no transfer push seen"
                            await asyncio.sleep(0.05)
                        status = (await client.get(f"/v1/payments/{resp.json()['id']}",
                                                   headers={"x-client-region": "eu-west"}))
                        assert status.json()["status"] in ("processing", "succeeded")

    finally:
        await to_eu.stop()
        await to_us.stop()

    # Hop 1: router -> us-east (HTTP), a child of the client's span.
    ingress = [h for path, h in us_ingress.requests
               if path == "/v1/payments" and h.get("x-request-id") == REQUEST_ID]
    assert len(ingress) == 1
    router_span = _assert_hop(ingress[0], CLIENT_SPAN)
    # Hop 2: us-east -> eu-west, the forward (gRPC), a child of the router's span...
    forwards = to_eu.of("Forward")
    assert len(forwards) == 1
    forward_span = _assert_hop(forwards[0], router_span)
    assert forwards[0]["paycluster-origin"] == "us-east"
    # ... whose span us-east made for the request it received (its traceresponse).
    # Hop 3: eu-west -> us-east, the transfer push (gRPC), made while eu-west served the
    # forwarded payment: same trace, same request id, under a span of eu-west.
    pushes = to_us.of("ApplyTransfer")
    assert pushes, "transfer pushed"
    push_span = _assert_hop(pushes[0], pushes[0]["x-b3-parentspanid"])
    assert pushes[0]["x-b3-parentspanid"] not in (CLIENT_SPAN, router_span, forward_span)
    assert len({router_span, forward_span, push_span}) == 3
    assert pushes[0]["paycluster-origin"] == "eu-west"


def test_single_b3_header_and_b3_only_callers_keep_their_trace() -> None:
    from region_node.tracing import child_headers

    got = dict(child_headers({"b3": f"{TRACE_ID}-{CLIENT_SPAN}-1"}.get, "a" * 16))
    assert got["b3"] == f"{TRACE_ID}-{'a' * 16}-1-{CLIENT_SPAN}"
    # A B3-only caller (a mesh without W3C) gets a traceparent of the same trace.
    assert got["traceparent"] == f"00-{TRACE_ID}-{'a' * 16}-01"
    short = dict(child_headers({"x-b3-traceid": "463ac35c9f6413ad",
                                "x-b3-spanid": CLIENT_SPAN}.get, "b" * 16))
    assert short["traceparent"] == f"00-{'0' * 16}463ac35c9f6413ad-{'b' * 16}-01"
    assert short["x-b3-parentspanid"] == CLIENT_SPAN
    # No trace context at all: a new sampled trace, and no B3 or tracestate invented.
    fresh = dict(child_headers({}.get))
    assert set(fresh) == {"traceparent"} and parse_traceparent(fresh["traceparent"])
