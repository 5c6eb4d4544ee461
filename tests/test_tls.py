"""Links between regions are encrypted and authenticated.

gRPC: a region's server takes only clients that present a certificate of the cluster CA
(none, or one of another CA, is refused in the handshake: UNAVAILABLE); clients check the
server's certificate names the region they meant to reach.

PostgreSQL (on a running lab): every replication connection is TLS with the subscriber's
certificate (`pg_stat_ssl` of every walsender), and the replication role is refused
without TLS, without a client certificate, or with a certificate of another CA.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg.conninfo import make_conninfo

from cluster.lab import Cluster, start_cluster
from cluster.pki import create_ca, issue_cert, region_tls_files
from cluster.servers import RegionServers, free_port
from region_node.rpc.tls import RpcTls, cert_name
from replication.tls import REPLICATION_ROLE
from replication.wiring import ident, wait_until_replicating
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
    # A new CA: certificates of the old one are not kept, they are issued again.
    create_ca(tmp_path / "pki")
    renewed = ensure_cluster_pki(tmp_path, ["us-east"])["us-east"]
    assert renewed.cert_file.read_bytes() != before[renewed.cert_file]
    ca = x509.load_pem_x509_certificate(renewed.ca_file.read_bytes())
    x509.load_pem_x509_certificate(renewed.cert_file.read_bytes()).verify_directly_issued_by(ca)


# --------------------------------------------------------------------------- on a lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A two-region lab without WAN delay; stopped even on failure."""
    cluster = start_cluster(tmp_path_factory.mktemp("tls-lab"), regions=2, wan_scale=0)
    try:
        yield cluster
    finally:
        cluster.stop()


WALSENDERS_SQL = """
select a.application_name, a.usename, a.client_addr is null as via_socket
  from pg_stat_activity a
 where a.backend_type = 'walsender'
 order by a.application_name
"""


def _gateway_events(lab: Cluster) -> list[dict[str, object]]:
    assert lab.pg_tls is not None
    events = []
    for line in lab.pg_tls.log_path.read_text().splitlines():
        if line.startswith("{") and '"event"' in line:
            events.append(json.loads(line))
    return events


@pytest.mark.multiregion
def test_every_replication_connection_goes_through_mutual_tls(lab: Cluster) -> None:
    for region in lab.regions:
        wait_until_replicating(region.dsn, timeout_seconds=60)
    events = _gateway_events(lab)
    for publisher in lab.regions:
        with psycopg.connect(publisher.dsn, autocommit=True) as conn:
            senders = conn.execute(WALSENDERS_SQL).fetchall()
            conninfos = [r[0] for r in conn.execute("select subconninfo from pg_subscription")]
        subscribers = [r.name for r in lab.regions if r.name != publisher.name]
        # One walsender per subscriber, logged in as the replication role, and arrived on
        # the unix socket: through the publisher's TLS gateway, the only way pg_hba allows.
        assert senders == [(f"pc_{ident(publisher.name)}_to_{ident(s)}", REPLICATION_ROLE, True)
                           for s in sorted(subscribers, key=ident)], senders
        for subscriber in subscribers:
            # The publisher's gateway saw the subscriber's certificate, over TLS 1.3...
            assert any(e["event"] == "accepted" and e["region"] == publisher.name
                       and e["peer"] == cert_name(subscriber) and e["version"] == "TLSv1.3"
                       for e in events), events
            # ...and the subscriber's gateway checked the publisher's.
            assert any(e["event"] == "connected" and e["src"] == subscriber
                       and e["dst"] == publisher.name and e["peer"] == cert_name(publisher.name)
                       for e in events), events
        # This region's subscriptions go to its own client gateways, as the role.
        assert lab.pg_tls is not None
        ports = {lab.pg_tls.client_port(publisher.name, s) for s in subscribers}
        assert len(conninfos) == len(subscribers)
        for info in conninfos:
            assert f"user={REPLICATION_ROLE}" in info
            assert int(info.split("port=")[1].split()[0]) in ports, info


def _connect(port: int, **params: str) -> psycopg.Connection[tuple[object, ...]]:
    conninfo = make_conninfo(host="127.0.0.1", port=str(port), dbname="paycluster",
                             user=REPLICATION_ROLE, connect_timeout="5", **params)
    return psycopg.connect(conninfo, autocommit=True)


@pytest.mark.multiregion
def test_replication_role_needs_tls_and_a_cluster_certificate(lab: Cluster,
                                                               tmp_path: Path) -> None:
    publisher, subscriber = lab.regions[0], lab.regions[1]
    direct = publisher.servers.postgres.port
    gateway = publisher.pg_gateway_port
    via_wan = lab.link_port(subscriber.name, publisher.name, "postgres")
    files = region_tls_files(lab.data_dir, subscriber.name)
    # libpq 17+ can speak TLS from the first byte, as the gateways do.
    direct_tls = {"sslnegotiation": "direct", "sslmode": "verify-full",
                  "sslrootcert": str(files.ca_file)}
    other_ca, other_key = create_ca(tmp_path / "other", "someone else's CA")
    issue_cert(other_ca, other_key, cert_name(subscriber.name), tmp_path / "other" / "x.crt",
               tmp_path / "other" / "x.key")
    # No client certificate may be picked up from ~/.postgresql by accident.
    no_cert = {"sslcert": str(tmp_path / "none.crt"), "sslkey": str(tmp_path / "none.key")}

    # Straight to PostgreSQL over TCP: the role is refused whatever it presents.
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf rejects"):
        _connect(direct, sslmode="disable")
    # To the gateway without TLS, with TLS but no certificate, with another CA's: refused.
    with pytest.raises(psycopg.OperationalError):
        _connect(gateway, sslmode="disable")
    with pytest.raises(psycopg.OperationalError):
        _connect(gateway, **direct_tls, **no_cert)
    with pytest.raises(psycopg.OperationalError):
        _connect(gateway, **direct_tls, sslcert=str(tmp_path / "other" / "x.crt"),
                 sslkey=str(tmp_path / "other" / "x.key"))
    # A cluster certificate gets in, at the gateway and across the WAN link to it.
    for port in (gateway, via_wan):
        with _connect(port, **direct_tls, sslcert=str(files.cert_file),
                      sslkey=str(files.key_file)) as conn:
            row = conn.execute("select current_user, inet_client_addr() is null").fetchone()
            assert row == (REPLICATION_ROLE, True)
    refused = [e for e in _gateway_events(lab)
               if e["event"] == "refused" and e.get("gateway") == "server"]
    assert len(refused) >= 3, refused


@pytest.mark.multiregion
async def test_lab_nodes_talk_grpc_only_over_mutual_tls(lab: Cluster, tmp_path: Path) -> None:
    """`paycluster up` gives every node its certificate: its gRPC port (directly, and as a
    peer reaches it through the WAN link) takes cluster members only."""
    us, eu = lab.region("us-east"), lab.region("eu-west")
    files = region_tls_files(lab.data_dir, eu.name)
    member = RpcTls.from_files(files.ca_file, files.cert_file, files.key_file)
    other_ca, other_key = create_ca(tmp_path / "other", "someone else's CA")
    issue_cert(other_ca, other_key, cert_name(eu.name), tmp_path / "other" / "x.crt",
               tmp_path / "other" / "x.key")
    for target in (f"127.0.0.1:{us.grpc_port}", eu.peers[us.name]):
        assert await _health(target, member.channel_credentials(), cert_name(us.name)) == \
            grpc.StatusCode.OK
        assert await _health(target, None) == grpc.StatusCode.UNAVAILABLE
        assert await _health(target, grpc.ssl_channel_credentials(
            member.ca, (tmp_path / "other" / "x.key").read_bytes(),
            (tmp_path / "other" / "x.crt").read_bytes()), cert_name(us.name)) == \
            grpc.StatusCode.UNAVAILABLE
    assert "mutual TLS" in (us.node.log_path.read_text() if us.node else "")
