"""The gRPC server of a region node: the Region service and grpc.health.v1."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import httpx
from fastapi import FastAPI
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import refunds, stock, tracing, transfers
from region_node.errors import PaymentError
from region_node.forwarding import (
    FORWARDED_FROM,
    ForwardedResponse,
    Header,
    trusted_forward_headers,
)
from region_node.logs import request_id, traceparent
from region_node.node import Node
from region_node.ownership import PeerOwnership
from region_node.rpc import region_pb2 as pb
from region_node.rpc import region_pb2_grpc as pb_grpc
from region_node.rpc import wire
from region_node.rpc.errors import status_for, trailers_for
from region_node.rpc.tls import RpcTls, require_loopback

log = logging.getLogger(__name__)


Resp = TypeVar("Resp")


class RegionService(pb_grpc.RegionServicer):
    """Implements paycluster.v1.Region for one node."""

    def __init__(self, node: Node, app: FastAPI) -> None:
        self.node = node
        self.app = app
        self._http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                       base_url="http://forwarded")

    async def _guard(self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[Resp]]
                     ) -> Resp:
        meta = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        rid = request_id.set(meta.get("x-request-id") or uuid.uuid4().hex)
        span, carried = tracing.enter(meta.get)
        trace = traceparent.set(span)
        carried_token = tracing.propagated.set(carried)
        try:
            return await call()
        except PaymentError as exc:
            context.set_trailing_metadata(trailers_for(exc))
            await context.abort(status_for(exc), exc.message)
            raise  # abort() raises; this line only tells the type checker
        finally:
            request_id.reset(rid)
            traceparent.reset(trace)
            tracing.propagated.reset(carried_token)

    async def Forward(self, request: pb.ForwardRequest,
                      context: grpc.aio.ServicerContext) -> pb.ForwardResponse:
        """Replay a public API request against this node's own app."""
        async def call() -> pb.ForwardResponse:
            forwarded = wire.forward_request_from_pb(request)
            # A peer (authenticated by mutual TLS) may carry the caller's principal; our
            # own app trusts it only with this process's token (forwarding.py).
            headers = trusted_forward_headers(self.app, dict(forwarded.headers))
            headers[FORWARDED_FROM] = forwarded.origin_region or "unknown"
            # The call's metadata wins over copied headers: it is this hop's context.
            if request_id.get():
                headers["x-request-id"] = request_id.get() or ""
            if traceparent.get():
                headers["traceparent"] = traceparent.get() or ""
            headers.update(tracing.propagated.get())
            query = f"?{forwarded.query}" if forwarded.query else ""
            resp = await self._http.request(forwarded.method, forwarded.path + query,
                                            content=forwarded.body, headers=headers)
            return wire.forward_response_to_pb(ForwardedResponse(
                status=resp.status_code, served_by=self.node.region, body=resp.content,
                headers=tuple(Header(k, v) for k, v in resp.headers.items()
                              if k.lower() not in ("content-length", "transfer-encoding"))))
        return await self._guard(context, call)

    async def ApplyTransfer(self, request: pb.TransferMessage,
                            context: grpc.aio.ServicerContext) -> pb.TransferResult:
        """Credit a cross-region payment's payee exactly once (or say why not)."""
        async def call() -> pb.TransferResult:
            message = wire.transfer_message_from_pb(request)
            outcome = await transfers.apply_message(self.node.db, region=self.node.region,
                                                    message=message)
            return wire.transfer_outcome_to_pb(outcome)
        return await self._guard(context, call)

    async def ApplyRefund(self, request: pb.RefundMessage,
                          context: grpc.aio.ServicerContext) -> pb.RefundResult:
        """Credit a cross-region refund's payer exactly once (or say why not)."""
        async def call() -> pb.RefundResult:
            message = wire.refund_message_from_pb(request)
            outcome = await refunds.apply_message(self.node.db, region=self.node.region,
                                                  message=message)
            return wire.refund_outcome_to_pb(outcome)
        return await self._guard(context, call)

    async def GetOwnership(self, request: pb.OwnershipRequest,
                           context: grpc.aio.ServicerContext) -> pb.OwnershipReply:
        """This region's view of the ownership table."""
        async def call() -> pb.OwnershipReply:
            await self.node.ownership.refresh()
            return wire.ownership_to_pb(PeerOwnership(
                self.node.region, tuple(self.node.ownership.snapshot())))
        return await self._guard(context, call)

    async def GrantStock(self, request: pb.StockGrantRequest,
                         context: grpc.aio.ServicerContext) -> pb.StockGrantReply:
        """Give units of a SKU from this region's allotment (fenced by the caller's token)."""
        async def call() -> pb.StockGrantReply:
            wanted = wire.grant_request_from_pb(request)

            async def step(conn: AsyncConnection) -> stock.Grant:
                return await stock.grant(conn, request=wanted, me=self.node.region)
            return wire.grant_to_pb(await self.node.db.transaction(step))
        return await self._guard(context, call)

    async def close(self) -> None:
        """Release the in-process HTTP client."""
        await self._http.aclose()


async def start_grpc_server(node: Node, app: FastAPI, host: str = "127.0.0.1"
                            ) -> tuple[grpc.aio.Server, RegionService]:
    """Serve the Region service and grpc.health.v1 on settings.grpc_port."""
    server = grpc.aio.server()
    service = RegionService(node, app)
    pb_grpc.add_RegionServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Mutual TLS, or (test-only setting, else from_settings refuses) plaintext on loopback.
    tls = RpcTls.from_settings(node.settings)
    if tls is None:
        require_loopback(host, "gRPC server")
    address = f"{host}:{node.settings.grpc_port}"
    # With TLS files configured only mutual TLS is served: no plaintext port at all.
    port = (server.add_secure_port(address, tls.server_credentials()) if tls is not None
            else server.add_insecure_port(address))
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC port {node.settings.grpc_port}")
    await server.start()
    for name in ("", "paycluster.v1.Region"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if tls is not None:
        log.info("gRPC serving on %s:%d (mutual TLS)", host, port)
    else:
        log.warning("gRPC serving on %s:%d in PLAINTEXT (test-only "
                    "PAYCLUSTER_GRPC_INSECURE_LOOPBACK_ONLY)", host, port)
    return server, service
