"""Protobuf conversion of the Region service's messages, in one place.

Everything above `region_node/rpc/` speaks domain types (`forwarding.ForwardedRequest`,
`transfers.TransferMessage`, `refunds.RefundOutcome`, `stock.Grant`,
`ownership.PeerOwnership`); the client converts on the way out and back,
the server on the way in and out. A peer's request is untrusted input: the `*_from_pb`
functions the server uses refuse malformed ids and non-positive amounts with
InvalidRequest (the caller gets it back as the same domain error).
"""

from __future__ import annotations

import uuid

from region_node import refunds, stock, transfers
from region_node.errors import InvalidRequest
from region_node.forwarding import ForwardedRequest, ForwardedResponse, Header
from region_node.ownership import Owner, PeerOwnership
from region_node.rpc import region_pb2 as pb


def _uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise InvalidRequest(f"{field} is not a UUID", param=field) from exc


def _positive(amount: int) -> int:
    if amount <= 0:
        raise InvalidRequest("amount must be positive", param="amount")
    return amount


# --------------------------------------------------------------------------- forwarding

def _headers_to_pb(headers: tuple[Header, ...]) -> list[pb.Header]:
    return [pb.Header(name=h.name, value=h.value) for h in headers]


def _headers_from_pb(headers: list[pb.Header]) -> tuple[Header, ...]:
    return tuple(Header(h.name, h.value) for h in headers)


def forward_request_to_pb(request: ForwardedRequest) -> pb.ForwardRequest:
    """The wire form of a forwarded request (client side)."""
    return pb.ForwardRequest(method=request.method, path=request.path, query=request.query,
                             headers=_headers_to_pb(request.headers), body=request.body,
                             origin_region=request.origin_region)


def forward_request_from_pb(request: pb.ForwardRequest) -> ForwardedRequest:
    """A peer's forwarded request (server side)."""
    return ForwardedRequest(method=request.method, path=request.path,
                            origin_region=request.origin_region, query=request.query,
                            headers=_headers_from_pb(list(request.headers)),
                            body=request.body)


def forward_response_to_pb(response: ForwardedResponse) -> pb.ForwardResponse:
    """The wire form of the owner's answer (server side)."""
    return pb.ForwardResponse(status=response.status, body=response.body,
                              served_by=response.served_by,
                              headers=_headers_to_pb(response.headers))


def forward_response_from_pb(reply: pb.ForwardResponse) -> ForwardedResponse:
    """The owner's answer (client side)."""
    return ForwardedResponse(status=reply.status, served_by=reply.served_by,
                             headers=_headers_from_pb(list(reply.headers)), body=reply.body)


# --------------------------------------------------------------------------- ownership

def ownership_to_pb(view: PeerOwnership) -> pb.OwnershipReply:
    """The wire form of this region's ownership view (server side)."""
    return pb.OwnershipReply(region=view.region, entries=[
        pb.OwnershipEntry(home_region=o.home_region, serving_region=o.serving_region,
                          epoch=o.epoch) for o in view.entries])


def ownership_from_pb(reply: pb.OwnershipReply) -> PeerOwnership:
    """A peer's ownership view (client side)."""
    return PeerOwnership(region=reply.region, entries=tuple(
        Owner(e.home_region, e.serving_region, e.epoch) for e in reply.entries))


# --------------------------------------------------------------------------- transfers

def transfer_message_to_pb(message: transfers.TransferMessage) -> pb.TransferMessage:
    """The wire form of a transfer message (client side)."""
    return pb.TransferMessage(
        id=str(message.id), payment_id=str(message.payment_id),
        payer_id=str(message.payer_id), payee_id=str(message.payee_id),
        from_home=message.from_home, to_home=message.to_home, amount=message.amount,
        currency=message.currency)


def transfer_message_from_pb(request: pb.TransferMessage) -> transfers.TransferMessage:
    """A peer's transfer message, validated (server side)."""
    message = transfers.TransferMessage(
        id=_uuid(request.id, "id"), payment_id=_uuid(request.payment_id, "payment_id"),
        payer_id=_uuid(request.payer_id, "payer_id"),
        payee_id=_uuid(request.payee_id, "payee_id"), from_home=request.from_home,
        to_home=request.to_home, amount=request.amount, currency=request.currency)
    _positive(message.amount)
    return message


def transfer_outcome_to_pb(outcome: transfers.TransferOutcome) -> pb.TransferResult:
    """The wire form of the payee region's answer (server side)."""
    return pb.TransferResult(transfer_id=str(outcome.transfer_id), outcome=outcome.outcome,
                             reason=outcome.reason or "")


def transfer_outcome_from_pb(result: pb.TransferResult) -> transfers.TransferOutcome:
    """The payee region's answer (client side); an empty reason is none."""
    return transfers.TransferOutcome(uuid.UUID(result.transfer_id), result.outcome,
                                     result.reason or None)


# --------------------------------------------------------------------------- refunds

def refund_message_to_pb(message: refunds.RefundMessage) -> pb.RefundMessage:
    """The wire form of a cross-region refund (client side)."""
    return pb.RefundMessage(
        id=str(message.id), payment_id=str(message.payment_id), from_home=message.from_home,
        to_home=message.to_home, amount=message.amount, currency=message.currency)


def refund_message_from_pb(request: pb.RefundMessage) -> refunds.RefundMessage:
    """A peer's refund message, validated (server side)."""
    message = refunds.RefundMessage(
        id=_uuid(request.id, "id"), payment_id=_uuid(request.payment_id, "payment_id"),
        from_home=request.from_home, to_home=request.to_home, amount=request.amount,
        currency=request.currency)
    _positive(message.amount)
    return message


def refund_outcome_to_pb(outcome: refunds.RefundOutcome) -> pb.RefundResult:
    """The wire form of the payer region's answer (server side)."""
    return pb.RefundResult(refund_id=str(outcome.refund_id), outcome=outcome.outcome,
                           reason=outcome.reason or "",
                           payer_id=str(outcome.payer_id) if outcome.payer_id else "")


def refund_outcome_from_pb(result: pb.RefundResult) -> refunds.RefundOutcome:
    """The payer region's answer (client side); empty reason and payer are none."""
    return refunds.RefundOutcome(
        uuid.UUID(result.refund_id), result.outcome, result.reason or None,
        uuid.UUID(result.payer_id) if result.payer_id else None)


# --------------------------------------------------------------------------- stock

def grant_request_to_pb(request: stock.GrantRequest) -> pb.StockGrantRequest:
    """The wire form of a request for units (client side)."""
    return pb.StockGrantRequest(grant_id=str(request.grant_id), sku=request.sku,
                                to_region=request.to_region, wanted=request.wanted,
                                fence=request.fence)


def grant_request_from_pb(request: pb.StockGrantRequest) -> stock.GrantRequest:
    """A peer's request for units (server side); the grant id must be a UUID."""
    return stock.GrantRequest(grant_id=_uuid(request.grant_id, "grant_id"), sku=request.sku,
                              to_region=request.to_region, wanted=request.wanted,
                              fence=request.fence)


def grant_to_pb(grant: stock.Grant) -> pb.StockGrantReply:
    """The wire form of what the donor gave (server side; units 0: none free)."""
    return pb.StockGrantReply(grant_id=str(grant.id), sku=grant.sku,
                              from_region=grant.from_region, to_region=grant.to_region,
                              units=grant.units, fence=grant.fence)


def grant_from_pb(reply: pb.StockGrantReply) -> stock.Grant:
    """What the donor gave (client side)."""
    return stock.Grant(uuid.UUID(reply.grant_id), reply.sku, reply.from_region,
                       reply.to_region, reply.units, reply.fence)
