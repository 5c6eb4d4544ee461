"""The cluster's certificate authority and every region's certificate (mutual TLS between
regions: gRPC and PostgreSQL replication).

Layout under `<data_dir>/pki/`:

- `ca.crt`, `ca.key`: the cluster CA (EC P-256, ten years). The key is mode 0600 and is
  only read here, to issue region certificates.
- `<region>.crt`, `<region>.key`: the region's certificate (EC P-256, one year), usable as
  server and client (extended key usage serverAuth + clientAuth). Subject CN and DNS SAN
  `<region>.paycluster.internal`, plus IP SAN 127.0.0.1 because the lab's links all end on
  loopback (PostgreSQL's `sslmode=verify-full` checks the host it dialled against the SAN).

P-256 rather than Ed25519: gRPC's TLS stack, OpenSSL in PostgreSQL and libpq all take it.
Everything is idempotent: an existing CA is reused, and a region certificate is reused
while it is signed by that CA, names the region and has more than 30 days left.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from region_node.rpc.tls import cert_name

PKI_DIR = "pki"
"""Folder of the PKI files under a lab's data dir."""

CA_NAME = "paycluster cluster CA"
CA_DAYS = 3650
CERT_DAYS = 365
RENEW_BEFORE_DAYS = 30
LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


@dataclass(frozen=True)
class TlsFiles:
    """One region's TLS material on disk: the CA to trust, its certificate and key, and the
    name its certificate carries."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    name: str

    def node_env(self, peers: list[str]) -> dict[str, str]:
        """The PAYCLUSTER_TLS_* settings of a region node using these files."""
        import json

        return {"PAYCLUSTER_TLS_CA_FILE": str(self.ca_file),
                "PAYCLUSTER_TLS_CERT_FILE": str(self.cert_file),
                "PAYCLUSTER_TLS_KEY_FILE": str(self.key_file),
                "PAYCLUSTER_TLS_PEER_NAMES": json.dumps({p: cert_name(p) for p in peers})}


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with `mode` from the first byte (a key is never world-readable)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8, unencrypted: gRPC, PostgreSQL and libpq read it without a passphrase.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(directory: Path, common_name: str = CA_NAME) -> tuple[Path, Path]:
    """Create a new self-signed CA in `directory` (ca.crt, ca.key 0600), replacing any."""
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "paycluster")])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "ca.key", directory / "ca.crt"
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def ensure_ca(directory: Path) -> tuple[Path, Path]:
    """The CA in `directory`, created on first use and reused afterwards."""
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    return create_ca(directory)


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate,
                                                       ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    return cert, key


def _still_good(cert_path: Path, key_path: Path, ca: x509.Certificate, name: str) -> bool:
    """True if the certificate on disk is ours to keep: signed by `ca`, for `name`, with its
    key next to it, and not about to expire."""
    if not (cert_path.exists() and key_path.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound, OSError):
        return False
    same_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    fresh = cert.not_valid_after_utc - _now() > dt.timedelta(days=RENEW_BEFORE_DAYS)
    return (same_key and fresh and name in sans.get_values_for_type(x509.DNSName)
            and LOOPBACK in sans.get_values_for_type(x509.IPAddress))


def issue_cert(ca_cert: Path, ca_key: Path, name: str, cert_path: Path, key_path: Path,
               days: int = CERT_DAYS) -> None:
    """Issue a server+client certificate for DNS `name` (and IP 127.0.0.1) signed by the CA;
    write it and its new key (mode 0600)."""
    ca, ca_private = _load_ca(ca_cert, ca_key)
    key = _new_key()
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                        "paycluster")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=days), ca.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(LOOPBACK)]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_private.public_key()), critical=False)
            .sign(ca_private, hashes.SHA256()))
    # Key first: a certificate on disk always has its key next to it.
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def ensure_region_cert(directory: Path, region: str) -> TlsFiles:
    """Region `region`'s certificate in `directory` (CA created if missing), issued on first
    use, reused while still good (see the module docstring), reissued otherwise."""
    ca_cert, ca_key = ensure_ca(directory)
    name = cert_name(region)
    cert_path, key_path = directory / f"{region}.crt", directory / f"{region}.key"
    ca, _ = _load_ca(ca_cert, ca_key)
    if not _still_good(cert_path, key_path, ca, name):
        issue_cert(ca_cert, ca_key, name, cert_path, key_path)
    return TlsFiles(ca_cert, cert_path, key_path, name)


def region_tls_files(data_dir: Path, region: str) -> TlsFiles:
    """Where region `region`'s TLS files live under `data_dir` (made by ensure_cluster_pki)."""
    directory = data_dir.resolve() / PKI_DIR
    return TlsFiles(directory / "ca.crt", directory / f"{region}.crt",
                    directory / f"{region}.key", cert_name(region))


def ensure_cluster_pki(data_dir: Path, regions: list[str] | tuple[str, ...]
                       ) -> dict[str, TlsFiles]:
    """The CA and a certificate for every region under `<data_dir>/pki/` (idempotent).

    The folder is 0755 (the PostgreSQL user must reach its region's files in it); keys are
    0600 (the caller hands each region's key to the user that runs its PostgreSQL).
    """
    directory = data_dir.resolve() / PKI_DIR
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    return {region: ensure_region_cert(directory, region) for region in regions}
