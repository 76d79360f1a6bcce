"""A self-signed certificate for the development TLS listener (``switchboard dev-cert``).

Browsers speak HTTP/2 only over TLS, so the edge's TLS listener is what lets a
page keep more than six streams open. This makes the certificate a developer's
machine needs: ECDSA P-256, valid for ``localhost``, 127.0.0.1 and ::1 (plus any
``--host``), short-lived, the key written owner-only. It is for development:
browsers warn about it until it is trusted, and production uses a real CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from switchboard.platform.values import names

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 30
MAX_DAYS = 397  # what browsers accept for a server certificate


class CertError(Exception):
    """The certificate cannot be written as asked."""


@dataclass(frozen=True)
class DevCert:
    cert_file: Path
    key_file: Path
    hosts: tuple[str, ...]
    not_after: dt.datetime


def _names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_dev_cert(
    directory: Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    now: dt.datetime | None = None,
) -> DevCert:
    """Write ``dev-cert.pem`` and ``dev-key.pem`` in ``directory``; refuse to overwrite
    unless ``force``."""
    if not 1 <= days <= MAX_DAYS:
        raise CertError(f"days must be between 1 and {MAX_DAYS}")
    hosts = tuple(dict.fromkeys(hosts))
    if not hosts:
        raise CertError("at least one host is needed")
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "dev-cert.pem", directory / "dev-key.pem"
    if not force and (cert_file.exists() or key_file.exists()):
        raise CertError(f"{cert_file} or {key_file} exists (--force replaces them)")
    now = now or names.now()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "switchboard development")])
    not_after = now + dt.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_file, key_pem, mode=0o600)
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return DevCert(cert_file, key_file, hosts, not_after)


def _write(path: Path, data: bytes, *, mode: int) -> None:
    # Written beside, then renamed: a reader never sees half a key, and the
    # key is owner-only from its first byte.
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(partial, mode)
    partial.replace(path)
