"""Mutual TLS for the gRPC links between regions.

Every region holds a certificate of the cluster CA that names it `<region>.paycluster.internal`
(see cluster.pki). A region's gRPC server accepts only clients that present a certificate
of that CA; a client checks that the server's certificate is of that CA and carries the
name of the region it meant to reach. Peers are dialled at addresses that say nothing
about the region (in the lab: a WAN-link port on 127.0.0.1), so the expected name is set
explicitly with `grpc.ssl_target_name_override`.

Without the three files a node that serves gRPC or dials peers refuses to start
(`InsecureGrpcRefused`): the owner trusts the principal a forwarded request carries only
because mutual TLS authenticated the peer. The one exception is the test-only
`PAYCLUSTER_GRPC_INSECURE_LOOPBACK_ONLY=true`: plaintext, bound and dialled on 127.0.0.1
only, logged as a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from region_node.config import RegionSettings

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
"""The only address plaintext gRPC may bind or dial (test-only setting)."""

CERT_DOMAIN = "paycluster.internal"
"""DNS suffix of the name every region's certificate carries."""


class InsecureGrpcRefused(ValueError):
    """gRPC to or from peers was configured without mutual TLS, outside the test-only
    loopback setting: the node refuses to start."""


def require_loopback(target: str, what: str) -> None:
    """InsecureGrpcRefused unless `target` (`host:port`, or a bare host) is 127.0.0.1."""
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 else target
    if host != LOOPBACK:
        raise InsecureGrpcRefused(
            f"{what} at {target!r}: plaintext gRPC (PAYCLUSTER_GRPC_INSECURE_LOOPBACK_ONLY) "
            f"only binds and dials {LOOPBACK}; configure mutual TLS "
            "(PAYCLUSTER_TLS_CA_FILE, PAYCLUSTER_TLS_CERT_FILE, PAYCLUSTER_TLS_KEY_FILE)")


def cert_name(region: str) -> str:
    """The DNS name region `region`'s certificate carries (`eu-west.paycluster.internal`)."""
    return f"{region}.{CERT_DOMAIN}"


@dataclass(frozen=True)
class RpcTls:
    """The PEM bytes a node needs for mutual TLS, and the name each peer must present."""

    ca: bytes
    cert: bytes
    key: bytes
    peer_names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_files(cls, ca_file: str | Path, cert_file: str | Path, key_file: str | Path,
                   peer_names: dict[str, str] | None = None) -> RpcTls:
        """Read the CA certificate, this region's certificate and its private key."""
        return cls(Path(ca_file).read_bytes(), Path(cert_file).read_bytes(),
                   Path(key_file).read_bytes(), dict(peer_names or {}))

    @classmethod
    def from_settings(cls, settings: RegionSettings) -> RpcTls | None:
        """The node's TLS material; None only where plaintext is allowed: a node without
        gRPC (no server port, no peers), or one under the test-only
        `grpc_insecure_loopback_only` setting whose peers are all on 127.0.0.1.

        Anything else without the three files is refused (InsecureGrpcRefused), and half
        a configuration is an error: never a silent fallback to plaintext, since the
        owner trusts the principal a forwarded request carries because the link is
        mutual TLS.
        """
        files = (settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
        if all(files):
            return cls.from_files(*files, peer_names=settings.tls_peer_names)
        if any(files):
            raise ValueError("PAYCLUSTER_TLS_CA_FILE, PAYCLUSTER_TLS_CERT_FILE and "
                             "PAYCLUSTER_TLS_KEY_FILE must be set together")
        if not settings.grpc_port and not settings.peers:
            return None  # no gRPC at all: nothing to protect
        if not settings.grpc_insecure_loopback_only:
            raise InsecureGrpcRefused(
                f"region {settings.region}: gRPC between regions requires mutual TLS; set "
                "PAYCLUSTER_TLS_CA_FILE, PAYCLUSTER_TLS_CERT_FILE and PAYCLUSTER_TLS_KEY_FILE "
                "(a peer's forwarded principal is trusted because the link is mutual TLS). "
                "Tests on one machine only: PAYCLUSTER_GRPC_INSECURE_LOOPBACK_ONLY=true "
                "(plaintext, 127.0.0.1 only)")
        for peer, target in sorted(settings.peers.items()):
            require_loopback(target, f"peer {peer}")
        log.warning("INSECURE: region %s runs gRPC in PLAINTEXT between regions "
                    "(PAYCLUSTER_GRPC_INSECURE_LOOPBACK_ONLY=true, test-only, 127.0.0.1 "
                    "only): forwarded principals are trusted without mutual TLS",
                    settings.region)
        return None

    def peer_name(self, peer: str) -> str:
        """The name `peer`'s certificate must carry."""
        return self.peer_names.get(peer) or cert_name(peer)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server side: our certificate; clients must present one of the cluster CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client side: trust only the cluster CA, present our own certificate."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel_options(self, peer: str) -> list[tuple[str, str]]:
        """Channel options that make the handshake check `peer`'s name."""
        return [("grpc.ssl_target_name_override", self.peer_name(peer))]
