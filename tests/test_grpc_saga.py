"""Two region nodes in one process, each with its own database and gRPC server, talking
over real gRPC: forwarding to the owner, the cross-region saga via push (no replication
here: that path is covered by the multi-region suite), compensation, error mapping and
request-id propagation."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import httpx
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.servers import RegionServers, free_port
from region_node import errors as e
from region_node.app import create_app
from region_node.config import RegionSettings
from region_node.forwarding import ForwardedRequest
from region_node.logs import request_id, traceparent
from region_node.rpc import region_pb2 as pb
from region_node.rpc.client import PeerClients
from region_node.rpc.errors import from_rpc_error, status_for, trailers_for
from tests.conftest import rpc_tls, two_regions

pytestmark = pytest.mark.integration


async def _wait_status(client: httpx.AsyncClient, pid: str, status: str) -> dict[str, object]:
    deadline = time.monotonic() + 15
    while True:
        body: dict[str, object] = (await client.get(f"/v1/payments/{pid}")).json()
        if body["status"] == status:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


async def test_forwarding_and_cross_region_saga(servers: RegionServers) -> None:
    async with two_regions(servers) as (a, b, db_a, db_b, _):
        # Opened through us-east, homed in eu-west: forwarded and answered as if local.
        resp = await a.post("/v1/accounts", json={"currency": "EUR", "home_region": "eu-west"},
                            headers={"x-request-id": "req-forward-1"})
        assert resp.status_code == 201, resp.text
        assert resp.headers["Paycluster-Served-By"] == "eu-west"
        assert resp.headers["Paycluster-Owner"] == "eu-west"
        assert resp.headers["x-request-id"] == "req-forward-1"
        payee = resp.json()["id"]
        assert resp.json()["home_region"] == "eu-west"
        with psycopg.connect(db_b) as conn:
            assert conn.execute("select count(*) from accounts where id = %s",
                                (payee,)).fetchone() == (1,)
        with psycopg.connect(db_a) as conn:
            assert conn.execute("select count(*) from accounts where id = %s",
                                (payee,)).fetchone() == (0,), "never written locally"

        payer = (await a.post("/v1/accounts", json={"currency": "EUR"})).json()["id"]
        await a.post(f"/v1/accounts/{payer}/deposits", json={"amount": 10_000})
        # Sent to eu-west, the payer lives in us-east: forwarded to us-east, then a saga.
        created = await b.post("/v1/payments", json={
            "payer": payer, "payee": payee, "amount": 2_500, "currency": "EUR"})
        assert created.status_code == 201, created.text
        assert created.headers["Paycluster-Served-By"] == "us-east"
        pid = created.json()["id"]
        assert created.json()["status"] in ("processing", "succeeded")
        await _wait_status(a, pid, "succeeded")
        assert (await b.get(f"/v1/accounts/{payee}")).json()["balance"] == 2_500
        assert (await a.get(f"/v1/accounts/{payer}")).json()["balance"] == 7_500
        # In transit nets to zero once settled: +2500 clearing at us-east, -2500 at eu-west.
        with psycopg.connect(db_a) as conn:
            assert conn.execute("select balance from accounts where kind = 'clearing'"
                                ).fetchone() == (2_500,)
        with psycopg.connect(db_b) as conn:
            assert conn.execute("select balance from accounts where kind = 'clearing'"
                                ).fetchone() == (-2_500,)
            assert conn.execute("select outcome from transfer_results").fetchall() == [
                ("credited",)]


async def test_compensation_refunds_payer(servers: RegionServers) -> None:
    async with two_regions(servers) as (a, b, _db_a, db_b, _):
        payee = (await b.post("/v1/accounts", json={"currency": "USD"})).json()["id"]
        closed = await b.post(f"/v1/accounts/{payee}/close")
        assert closed.status_code == 200 and closed.json()["status"] == "closed"
        payer = (await a.post("/v1/accounts", json={"currency": "USD"})).json()["id"]
        await a.post(f"/v1/accounts/{payer}/deposits", json={"amount": 5_000})
        created = await a.post("/v1/payments", json={
            "payer": payer, "payee": payee, "amount": 1_200, "currency": "USD"})
        assert created.status_code == 201, created.text
        failed = await _wait_status(a, created.json()["id"], "failed")
        assert failed["failure_code"] == "account_closed"
        payer_view = (await a.get(f"/v1/accounts/{payer}")).json()
        assert payer_view["balance"] == 5_000 and payer_view["available"] == 5_000
        with psycopg.connect(db_b) as conn:
            assert conn.execute("select outcome, reason from transfer_results").fetchall() == [
                ("rejected", "account_closed")]
            assert conn.execute("select balance from accounts where id = %s",
                                (payee,)).fetchone() == (0,)


async def test_grpc_error_mapping_and_health(servers: RegionServers) -> None:
    async with two_regions(servers) as (a, b, _db_a, _db_b, ports):
        payer = (await a.post("/v1/accounts", json={"currency": "USD"})).json()["id"]
        payee = (await a.post("/v1/accounts", json={"currency": "USD"})).json()["id"]
        # Sent to eu-west, decided at us-east: the client sees us-east's exact answer.
        resp = await b.post("/v1/payments", json={
            "payer": payer, "payee": payee, "amount": 10, "currency": "USD"})
        assert resp.status_code == 402, resp.text
        assert resp.json()["error"]["code"] == "insufficient_funds"
        assert resp.headers["Paycluster-Served-By"] == "us-east"
        tls = rpc_tls(servers, "us-east")
        clients = PeerClients("us-east", {"eu-west": f"127.0.0.1:{ports['eu-west']}"}, 5.0,
                              tls=tls)
        try:
            with pytest.raises(e.InvalidRequest) as invalid:
                # Raw protobuf: no domain type can hold a malformed id.
                await clients.call("eu-west", "ApplyTransfer", pb.TransferMessage(
                    id="not-a-uuid", payment_id="x", payer_id="x", payee_id="x",
                    from_home="us-east", to_home="eu-west", amount=1, currency="USD"))
            assert invalid.value.param == "id"
            with pytest.raises(e.RegionUnavailable):
                await PeerClients("us-east", {"ap-southeast": f"127.0.0.1:{free_port()}"},
                                  1.0, tls=tls).ownership("ap-southeast")
            reply = await clients.ownership("eu-west")
            assert reply.region == "eu-west"
            assert [(x.home_region, x.serving_region) for x in reply.entries] == [
                ("eu-west", "eu-west")]
        finally:
            await clients.close()
        async with grpc.aio.secure_channel(
                f"127.0.0.1:{ports['eu-west']}", tls.channel_credentials(),
                options=tls.channel_options("eu-west")) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="paycluster.v1.Region"), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(("error", "status"), [
    (e.InvalidRequest("x", param="amount"), grpc.StatusCode.INVALID_ARGUMENT),
    (e.InsufficientFunds("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (e.NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (e.Conflict("x"), grpc.StatusCode.ABORTED),
    (e.IdempotencyInProgress("x"), grpc.StatusCode.ABORTED),
    (e.IdempotencyMismatch("x"), grpc.StatusCode.ALREADY_EXISTS),
    (e.RegionUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
])
def test_error_mapping_round_trip(error: e.PaymentError, status: grpc.StatusCode) -> None:
    assert status_for(error) == status

    class FakeRpcError(grpc.aio.AioRpcError):
        def __init__(self) -> None:
            super().__init__(status, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers_for(error)),
                             details="x")

    back = from_rpc_error(FakeRpcError())
    assert type(back) is type(error) and back.code == error.code
    assert back.http_status == error.http_status and back.param == error.param


async def test_request_id_and_trace_cross_regions(servers: RegionServers) -> None:
    async with two_regions(servers) as (_a, _b, _db_a, _db_b, ports):
        clients = PeerClients("us-east", {"eu-west": f"127.0.0.1:{ports['eu-west']}"}, 5.0,
                              tls=rpc_tls(servers, "us-east"))
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        rid_token = request_id.set("rid-propagation-1")
        trace_token = traceparent.set(f"00-{trace_id}-00f067aa0ba902b7-01")
        try:
            reply = await clients.forward("eu-west", ForwardedRequest(
                method="GET", path="/health/live", origin_region="us-east"))
        finally:
            request_id.reset(rid_token)
            traceparent.reset(trace_token)
            await clients.close()
        headers = {h.name.lower(): h.value for h in reply.headers}
        assert reply.status == 200 and reply.served_by == "eu-west"
        assert headers["x-request-id"] == "rid-propagation-1"
        # Same trace, a new span at the other region.
        assert headers["traceresponse"].split("-")[1] == trace_id
        assert headers["traceresponse"].split("-")[2] != "00f067aa0ba902b7"


async def test_pushes_in_flight_are_bounded(settings: RegionSettings) -> None:
    # Beyond saga_max_pushes_in_flight a push is not started (the scan delivers such a
    # message); once the running pushes end, new ones start again. Both sagas share it.
    app = create_app(settings.model_copy(update={"saga_max_pushes_in_flight": 2}))
    async with app.router.lifespan_context(app):
        transfers, refunds = app.state.transfer_worker, app.state.refund_worker
        assert refunds.max_pushes_in_flight == 2
        started = [transfers.push_soon(uuid.uuid4()) for _ in range(5)]
        assert started == [True, True, False, False, False]
        assert transfers.pushes_in_flight == 2 and transfers.pushes_skipped == 3
        # No such payments: each push finds no transfer message and ends.
        deadline = time.monotonic() + 30
        while transfers.pushes_in_flight:
            assert time.monotonic() < deadline, "pushes never ended"
            await asyncio.sleep(0.05)
        assert transfers.push_soon(uuid.uuid4()) is True
        assert transfers.pushes_skipped == 3
