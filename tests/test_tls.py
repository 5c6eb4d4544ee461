"""Links between regions are encrypted and authenticated.

gRPC: a region's server takes only clients that present a certificate of the cluster CA
(none, or one of another CA, is refused in the handshake: UNAVAILABLE); clients check the
server's certificate names the region they meant to reach.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.pki import create_ca, issue_cert
from cluster.servers import RegionServers, free_port
from region_node.rpc.tls import RpcTls, cert_name
from tests.conftest import app_client, fresh_database, pki_files, region_settings, tls_overrides

pytestmark = pytest.mark.integration

SERVICE = "paycluster.v1.Region"


async def _health(target: str, credentials: grpc.ChannelCredentials | None,
                  name: str | None = None) -> grpc.StatusCode:
    """Status of one grpc.health.v1 Check over a fresh channel (OK if it answered)."""
    options = [("grpc.ssl_target_name_override", name)] if name else []
    channel = (grpc.aio.secure_channel(target, credentials, options=options)
               if credentials is not None else grpc.aio.insecure_channel(target))
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


async def test_grpc_server_requires_a_cluster_certificate(servers: RegionServers,
                                                          tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    ours = pki_files(servers, "eu-west")  # a cluster member calling us-east
    ca = ours.ca_file.read_bytes()
    # Another CA, with a certificate that carries the very same name.
    other_ca, other_key = create_ca(tmp_path / "other", "someone else's CA")
    issue_cert(other_ca, other_key, cert_name("eu-west"), tmp_path / "other" / "eu.crt",
               tmp_path / "other" / "eu.key")
    foreign = RpcTls.from_files(other_ca, tmp_path / "other" / "eu.crt",
                                tmp_path / "other" / "eu.key")
    member = RpcTls.from_files(ours.ca_file, ours.cert_file, ours.key_file)
    with fresh_database(servers) as db:
        settings = region_settings(servers, db, region="us-east", grpc_port=port,
                                   peers={"eu-west": "127.0.0.1:1"},
                                   **tls_overrides(servers, "us-east"))
        async with app_client(settings):
            us_east = cert_name("us-east")
            # A member of the cluster (any region's certificate of our CA) gets in.
            assert await _health(target, member.channel_credentials(), us_east) == \
                grpc.StatusCode.OK
            # No client certificate: refused in the handshake.
            assert await _health(target, grpc.ssl_channel_credentials(ca), us_east) == \
                grpc.StatusCode.UNAVAILABLE
            # A certificate of another CA, even with a cluster name: refused.
            assert await _health(target, grpc.ssl_channel_credentials(
                ca, foreign.key, foreign.cert), us_east) == grpc.StatusCode.UNAVAILABLE
            # Plaintext: there is no plaintext port.
            assert await _health(target, None) == grpc.StatusCode.UNAVAILABLE
            # The client side checks names: us-east's server is not eu-west.
            assert await _health(target, member.channel_credentials(),
                                 cert_name("eu-west")) == grpc.StatusCode.UNAVAILABLE
            # ...and trusts only our CA: a client trusting the other CA refuses us-east.
            assert await _health(target, grpc.ssl_channel_credentials(
                foreign.ca, ours.key_file.read_bytes(), ours.cert_file.read_bytes()),
                us_east) == grpc.StatusCode.UNAVAILABLE


def test_half_a_tls_configuration_is_an_error(servers: RegionServers) -> None:
    files = pki_files(servers, "us-east")
    settings = region_settings(servers, "postgresql://x@127.0.0.1/x",
                               tls_ca_file=str(files.ca_file), tls_cert_file="")
    with pytest.raises(ValueError, match="must be set together"):
        RpcTls.from_settings(settings)


def test_pki_is_idempotent(tmp_path: Path) -> None:
    from cluster.pki import ensure_cluster_pki

    first = ensure_cluster_pki(tmp_path, ["us-east", "eu-west"])
    before = {p: p.read_bytes() for f in first.values()
              for p in (f.ca_file, f.cert_file, f.key_file)}
    again = ensure_cluster_pki(tmp_path, ["us-east", "eu-west"])
    assert again == first
    assert {p: p.read_bytes() for p in before} == before
    for files in first.values():
        assert files.key_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
