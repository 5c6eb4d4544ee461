"""Calls to other regions' nodes: one channel per peer, a deadline on every call, and the
request id and trace context carried along in metadata."""

from __future__ import annotations

import contextlib
from typing import Any

import grpc

from region_node import refunds, stock, transfers
from region_node.errors import RegionUnavailable
from region_node.forwarding import ForwardedRequest, ForwardedResponse
from region_node.logs import request_id, traceparent
from region_node.ownership import PeerOwnership
from region_node.rpc import region_pb2 as pb
from region_node.rpc import region_pb2_grpc as pb_grpc
from region_node.rpc import wire
from region_node.rpc.errors import from_rpc_error
from region_node.rpc.tls import InsecureGrpcRefused, RpcTls, require_loopback
from region_node.tracing import propagated

ORIGIN_KEY = "paycluster-origin"
"""gRPC metadata key naming the calling region."""


def call_metadata(origin: str) -> tuple[tuple[str, str], ...]:
    """Metadata every outgoing call carries: who asks, request id, trace context (W3C and,
    if the request came with it, B3)."""
    items = [(ORIGIN_KEY, origin)]
    rid = request_id.get()
    if rid:
        items.append(("x-request-id", rid))
    trace = traceparent.get()
    if trace:
        items.append(("traceparent", trace))
    # tracestate and B3, so a mesh (Istio) stitches the call into the caller's trace.
    items.extend(propagated.get())
    return tuple(items)


class PeerClients:
    """gRPC stubs for every other region, addressed as configured in `peers`."""

    def __init__(self, region: str, peers: dict[str, str], deadline: float,
                 tls: RpcTls | None = None, *, insecure_loopback_only: bool = False) -> None:
        """With `tls` every channel is mutual TLS and checks the peer's certificate name.
        Without, peers are refused (InsecureGrpcRefused) unless `insecure_loopback_only`
        (the test-only setting) and every peer is on 127.0.0.1: the peer trusts the
        principal we forward because the link is mutual TLS."""
        self.region = region
        self.peers = dict(peers)
        self.deadline = deadline
        self.tls = tls
        self.insecure_loopback_only = insecure_loopback_only
        self._channels: dict[str, grpc.aio.Channel] = {}
        for peer, target in sorted(self.peers.items()):
            self._check_plaintext(peer, target)

    def _check_plaintext(self, peer: str, target: str) -> None:
        """Refuse a plaintext channel unless the test-only loopback setting allows it."""
        if self.tls is not None:
            return
        if not self.insecure_loopback_only:
            raise InsecureGrpcRefused(
                f"region {self.region}: no mutual TLS for gRPC to peer {peer} ({target}); "
                "set PAYCLUSTER_TLS_CA_FILE, PAYCLUSTER_TLS_CERT_FILE and "
                "PAYCLUSTER_TLS_KEY_FILE")
        require_loopback(target, f"peer {peer}")

    def _stub(self, peer: str) -> pb_grpc.RegionStub:
        target = self.peers.get(peer)
        if target is None:
            raise RegionUnavailable(f"No route to region '{peer}'")
        channel = self._channels.get(peer)
        if channel is None:
            options: list[tuple[str, Any]] = [
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2_000)]
            self._check_plaintext(peer, target)
            if self.tls is not None:
                channel = grpc.aio.secure_channel(
                    target, self.tls.channel_credentials(),
                    options=options + self.tls.channel_options(peer))
            else:
                channel = grpc.aio.insecure_channel(target, options=options)
            self._channels[peer] = channel
        return pb_grpc.RegionStub(channel)

    async def call(self, peer: str, method: str, request: Any,
                   deadline: float | None = None) -> Any:
        """One unary call with a protobuf request (the typed methods below convert domain
        types around it; tests use it to send what no domain type can hold): the deadline,
        our metadata, and the peer's error rebuilt as the domain error it raised
        (transport failures as RegionUnavailable)."""
        stub_method = getattr(self._stub(peer), method)
        try:
            return await stub_method(request, timeout=deadline or self.deadline,
                                     metadata=call_metadata(self.region))
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err

    async def forward(self, peer: str, request: ForwardedRequest,
                      deadline: float | None = None) -> ForwardedResponse:
        """Run a public API request at `peer`; its answer."""
        reply: pb.ForwardResponse = await self.call(
            peer, "Forward", wire.forward_request_to_pb(request), deadline)
        return wire.forward_response_from_pb(reply)

    async def apply_transfer(self, peer: str, message: transfers.TransferMessage,
                             deadline: float | None = None) -> transfers.TransferOutcome:
        """Push a transfer message to the payee's region; its answer."""
        result: pb.TransferResult = await self.call(
            peer, "ApplyTransfer", wire.transfer_message_to_pb(message), deadline)
        return wire.transfer_outcome_from_pb(result)

    async def apply_refund(self, peer: str, message: refunds.RefundMessage,
                           deadline: float | None = None) -> refunds.RefundOutcome:
        """Push a cross-region refund to the payer's region; its answer."""
        result: pb.RefundResult = await self.call(
            peer, "ApplyRefund", wire.refund_message_to_pb(message), deadline)
        return wire.refund_outcome_from_pb(result)

    async def ownership(self, peer: str, deadline: float | None = None) -> PeerOwnership:
        """A peer's view of ownership."""
        reply: pb.OwnershipReply = await self.call(peer, "GetOwnership",
                                                   pb.OwnershipRequest(), deadline)
        return wire.ownership_from_pb(reply)

    async def grant_stock(self, peer: str, request: stock.GrantRequest,
                          deadline: float | None = None) -> stock.Grant:
        """Ask `peer` to give units of a SKU to this region; what it gave (units 0:
        none free)."""
        reply: pb.StockGrantReply = await self.call(
            peer, "GrantStock", wire.grant_request_to_pb(request), deadline)
        return wire.grant_from_pb(reply)

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()
