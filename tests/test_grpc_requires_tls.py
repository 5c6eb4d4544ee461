"""gRPC between regions is mutual TLS, or nothing.

The owner of an account trusts the principal a forwarded request carries because the
peer that forwarded it proved itself with a cluster certificate. A node deployed by hand
(or by compose/terraform) without the three TLS files used to fall back to plaintext and
trust forwarded principals from anyone who could reach its port. Now it refuses to start,
with an error that names the settings; the only exception is the explicit, test-only
PAYCLUSTER_GRPC_INSECURE_LOOPBACK_ONLY=true, which is logged loudly and binds and dials
127.0.0.1 only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cluster.nodes import NodeStartError, start_node
from cluster.servers import RegionServers, free_port
from region_node.config import RegionSettings
from region_node.rpc.client import PeerClients
from region_node.rpc.tls import InsecureGrpcRefused, RpcTls
from tests.conftest import fresh_database, two_regions

NO_TLS = {"tls_ca_file": "", "tls_cert_file": "", "tls_key_file": ""}


def _settings(**values: object) -> RegionSettings:
    return RegionSettings(**{"region": "us-east", **NO_TLS, **values})  # type: ignore[arg-type]


@pytest.mark.integration
def test_a_node_process_without_tls_refuses_to_start(servers: RegionServers,
                                                     tmp_path: Path) -> None:
    grpc_port = free_port()
    with fresh_database(servers) as db:
        env = {"PAYCLUSTER_DATABASE_URL": db, "PAYCLUSTER_GRPC_PORT": str(grpc_port),
               "PAYCLUSTER_TLS_CA_FILE": "", "PAYCLUSTER_TLS_CERT_FILE": "",
               "PAYCLUSTER_TLS_KEY_FILE": "", "PAYCLUSTER_GRPC_INSECURE_LOOPBACK_ONLY": "false",
               "PAYCLUSTER_RUN_WORKERS": "false"}
        try:
            node = start_node("us-east", servers, tmp_path, extra_env=env, timeout=60)
        except NodeStartError as exc:
            refusal = str(exc)
        else:
            node.stop()
            pytest.fail(f"the node started and served gRPC on {grpc_port} in plaintext")
    assert "refuses to start" in refusal and "requires mutual TLS" in refusal
    for name in ("PAYCLUSTER_TLS_CA_FILE", "PAYCLUSTER_TLS_CERT_FILE",
                 "PAYCLUSTER_TLS_KEY_FILE", "PAYCLUSTER_GRPC_INSECURE_LOOPBACK_ONLY"):
        assert name in refusal


@pytest.mark.parametrize("values", [
    {"grpc_port": 50051},                                       # a server for peers
    {"peers": {"eu-west": "127.0.0.1:50052"}},                  # a client of peers
    {"grpc_port": 50051, "peers": {"eu-west": "10.0.0.7:50051"}},
])
def test_grpc_without_tls_is_refused(values: dict[str, object]) -> None:
    with pytest.raises(InsecureGrpcRefused, match="requires mutual TLS"):
        RpcTls.from_settings(_settings(**values))


def test_a_node_without_grpc_needs_no_tls() -> None:
    assert RpcTls.from_settings(_settings()) is None


@pytest.mark.parametrize("target", ["10.0.0.7:50051", "localhost:50051", "[::1]:50051",
                                    "0.0.0.0:50051"])
def test_the_test_setting_only_dials_loopback(target: str) -> None:
    with pytest.raises(InsecureGrpcRefused, match=r"only binds and dials 127\.0\.0\.1"):
        RpcTls.from_settings(_settings(grpc_port=50051, peers={"eu-west": target},
                                       grpc_insecure_loopback_only=True))
    with pytest.raises(InsecureGrpcRefused, match=r"only binds and dials 127\.0\.0\.1"):
        PeerClients("us-east", {"eu-west": target}, 1.0, insecure_loopback_only=True)


def test_peer_clients_refuse_plaintext_without_the_setting() -> None:
    with pytest.raises(InsecureGrpcRefused, match="no mutual TLS"):
        PeerClients("us-east", {"eu-west": "127.0.0.1:50051"}, 1.0)


@pytest.mark.integration
async def test_the_test_setting_works_on_loopback_and_says_so(
        servers: RegionServers, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with two_regions(servers, **NO_TLS, grpc_insecure_loopback_only=True) as (
            a, b, _db_a, _db_b, _ports):
        payer = (await a.post("/v1/accounts", json={"currency": "USD"})).json()["id"]
        payee = (await a.post("/v1/accounts", json={"currency": "USD"})).json()["id"]
        # Sent to eu-west, forwarded over plaintext loopback gRPC, decided at us-east.
        resp = await b.post("/v1/payments", json={
            "payer": payer, "payee": payee, "amount": 10, "currency": "USD"})
        assert resp.status_code == 402, resp.text
        assert resp.headers["Paycluster-Served-By"] == "us-east"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("INSECURE" in m and "PLAINTEXT" in m for m in warnings), warnings
    assert any("gRPC serving on 127.0.0.1" in m and "PLAINTEXT" in m for m in warnings)
