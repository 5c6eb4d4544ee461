"""Mutual TLS for the gRPC links between regions.

Every region holds a certificate of the cluster CA that names it `<region>.paycluster.internal`
(see cluster.pki). A region's gRPC server accepts only clients that present a certificate
of that CA; a client checks that the server's certificate is of that CA and carries the
name of the region it meant to reach. Peers are dialled at addresses that say nothing
about the region (in the lab: a WAN-link port on 127.0.0.1), so the expected name is set
explicitly with `grpc.ssl_target_name_override`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from region_node.config import RegionSettings

CERT_DOMAIN = "paycluster.internal"
"""DNS suffix of the name every region's certificate carries."""


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
        """The node's TLS material, or None when none is configured (plaintext gRPC).

        Half a configuration is an error, not a silent fallback to plaintext.
        """
        files = (settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
        if not any(files):
            return None
        if not all(files):
            raise ValueError("PAYCLUSTER_TLS_CA_FILE, PAYCLUSTER_TLS_CERT_FILE and "
                             "PAYCLUSTER_TLS_KEY_FILE must be set together")
        return cls.from_files(*files, peer_names=settings.tls_peer_names)

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
