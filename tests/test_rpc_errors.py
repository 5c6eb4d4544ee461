"""Domain errors keep their identity across the gRPC hop between regions.

A region answers a forwarded call with a domain error; the caller must rebuild exactly
that error (class, code, message, param, type, HTTP status), or a client of another
region would see a generic 503 `region_unavailable` where the owner said `not_owner`,
`lease_lost` or `ownership_handover` - codes that tell it (and the router, and the
drill's workload) whether to retry elsewhere, later, or not at all.

The pure round trip covers every class of region_node/errors.py (found by walking the
hierarchy, so a class added later is covered too), each with its default code and with
a specific one; the last test does it through real gRPC servers with mutual TLS.
"""

from __future__ import annotations

import uuid

import grpc
import pytest

from cluster.servers import RegionServers
from region_node import errors as e
from region_node.rpc.client import PeerClients
from region_node.rpc.errors import from_rpc_error, status_for, trailers_for
from region_node.transfers import TransferMessage
from tests.conftest import rpc_tls, two_regions


def _classes() -> list[type[e.PaymentError]]:
    """PaymentError and every subclass defined in region_node/errors.py."""
    found: list[type[e.PaymentError]] = []
    todo: list[type[e.PaymentError]] = [e.PaymentError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == e.__name__:
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__name__)


def _cases() -> list[e.PaymentError]:
    cases: list[e.PaymentError] = []
    for cls in _classes():
        # Default code, no param; a specific code with a param that names the field.
        cases.append(cls(f"{cls.__name__} with its default code"))
        cases.append(cls(f"{cls.__name__}: something specific went wrong",
                         code=f"{cls.code}_specific", param="payee"))
    # The 503 codes a node raises for ownership (ownership.py, leases.py, stock_mover.py).
    for code in ("not_owner", "lease_lost", "ownership_handover", "lease_unavailable",
                 "lock_unavailable"):
        cases.append(e.RegionUnavailable(f"refused here: {code}", code=code))
    # The framework-error form api/errors.py builds (status and type set per instance).
    generic = e.PaymentError("Method Not Allowed", code="http_error")
    generic.http_status, generic.type = 405, "invalid_request_error"
    cases.append(generic)
    cases.append(e.RateLimited("slow down", retry_after=2.5))
    return cases


class _PeerRaised(grpc.aio.AioRpcError):
    """What grpc.aio raises at the caller when the peer aborted with `status`, the error's
    message as details and its trailers (built by the same functions the server uses)."""

    def __init__(self, error: e.PaymentError) -> None:
        super().__init__(status_for(error), grpc.aio.Metadata(),
                         grpc.aio.Metadata(*trailers_for(error)), details=error.message)


def _same(back: e.PaymentError, error: e.PaymentError) -> None:
    assert type(back) is type(error)
    assert (back.code, back.message, back.param, back.type, back.http_status) == (
        error.code, error.message, error.param, error.type, error.http_status)
    assert back.to_body() == error.to_body()


@pytest.mark.parametrize("error", _cases(), ids=lambda x: f"{type(x).__name__}-{x.code}")
def test_every_domain_error_survives_the_grpc_hop(error: e.PaymentError) -> None:
    back = from_rpc_error(_PeerRaised(error))
    _same(back, error)
    if isinstance(error, e.RateLimited):
        assert isinstance(back, e.RateLimited) and back.retry_after == error.retry_after


def test_the_hierarchy_is_what_the_round_trip_walked() -> None:
    # Guards the walk itself: a broken walk would make the test above vacuous.
    names = {c.__name__ for c in _classes()}
    assert {"PaymentError", "InvalidRequest", "PayloadTooLarge", "Unauthenticated",
            "Forbidden", "RateLimited", "InsufficientFunds", "NotFound", "Conflict",
            "IdempotencyInProgress", "IdempotencyMismatch", "RegionUnavailable"} <= names


@pytest.mark.parametrize("status", [grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.CANCELLED])
def test_a_transport_failure_is_region_unavailable(status: grpc.StatusCode) -> None:
    # No trailers: the peer never answered (connection refused, deadline, cancelled).
    err = grpc.aio.AioRpcError(status, grpc.aio.Metadata(), grpc.aio.Metadata(),
                               details="failed to connect to all addresses")
    back = from_rpc_error(err)
    assert type(back) is e.RegionUnavailable and back.code == "region_unavailable"
    assert back.http_status == 503


async def test_ownership_refusals_keep_their_code_through_real_grpc(
        servers: RegionServers) -> None:
    async with two_regions(servers) as (_a, b, _db_a, _db_b, ports):
        clients = PeerClients("us-east", {"eu-west": f"127.0.0.1:{ports['eu-west']}"}, 5.0,
                              tls=rpc_tls(servers, "us-east"))

        def message(to_home: str) -> TransferMessage:
            return TransferMessage(
                id=uuid.uuid4(), payment_id=uuid.uuid4(), payer_id=uuid.uuid4(),
                payee_id=uuid.uuid4(), from_home="us-east", to_home=to_home, amount=1,
                currency="USD")
        try:
            # eu-west does not serve us-east's accounts: not_owner, not a generic 503.
            with pytest.raises(e.RegionUnavailable) as refused:
                await clients.apply_transfer("eu-west", message("us-east"))
            assert refused.value.code == "not_owner"
            assert "does not serve home region us-east" in refused.value.message
            # eu-west pauses writes for its own home (the first step of a handover).
            ban = await b.post("/v1/admin/ownership/ban", json={"home_region": "eu-west"})
            assert ban.status_code == 200, ban.text
            with pytest.raises(e.RegionUnavailable) as paused:
                await clients.apply_transfer("eu-west", message("eu-west"))
            assert paused.value.code == "ownership_handover"
            assert paused.value.to_body()["error"]["type"] == "api_error"
        finally:
            await clients.close()
