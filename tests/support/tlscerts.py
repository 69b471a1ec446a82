"""Certificates made at test time: a throw-away CA and a server certificate it signed.

EC keys keep generation to a few milliseconds. The server certificate names
``localhost`` and ``127.0.0.1``, so a client that checks host names against the test CA
accepts it exactly as it would a real server's.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the PEM files written by :func:`make_pki`."""

    ca_cert: str
    #: the server certificate followed by nothing else (the CA is the trust anchor)
    cert: str
    key: str
    #: certificate and key in one file (``tls_cert`` without ``tls_key``)
    combined: str

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA and checks the host name."""
        return ssl.create_default_context(cafile=self.ca_cert)


def common_name(common: str) -> x509.Name:
    """A subject or issuer with just a common name."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def new_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key: generated in milliseconds, accepted by every TLS stack we test with."""
    return ec.generate_private_key(ec.SECP256R1())


def host_names(name: str = "localhost") -> x509.SubjectAlternativeName:
    """The SAN a loopback server needs: ``name`` and 127.0.0.1."""
    return x509.SubjectAlternativeName(
        [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )


def certificate(
    subject: str,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    signer: CertificateIssuerPrivateKeyTypes,
    valid: tuple[datetime.datetime, datetime.datetime],
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A certificate for ``subject`` signed by ``signer``; ``extensions`` are (value, critical)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(common_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """The key unencrypted, as qpconn's ``tls_key`` and ssl.load_cert_chain read it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_files(*files: tuple[str, bytes]) -> None:
    """Write each (path, data)."""
    for path, data in files:
        with open(path, "wb") as handle:
            handle.write(data)


def make_pki(directory: str, *, rsa_server: bool = False) -> TlsFiles:
    """Write a CA and a server certificate for localhost/127.0.0.1 into ``directory``.

    ``rsa_server``: the server key is RSA (2048 bits) instead of P-256, for tests of the
    RSA cipher suites (static-RSA key exchange needs an RSA certificate to be possible).
    """
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))
    ca_key = new_key()
    ca_usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    ca_cert = certificate(
        "qpconn test CA",
        common_name("qpconn test CA"),
        ca_key.public_key(),
        ca_key,
        valid,
        [
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (ca_usage, True),
            (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
        ],
    )
    key: CertificateIssuerPrivateKeyTypes = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048) if rsa_server else new_key()
    )
    cert = certificate(
        "localhost",
        ca_cert.subject,
        key.public_key(),
        ca_key,
        valid,
        [
            (host_names("localhost"), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
        ],
    )
    paths = TlsFiles(
        ca_cert=os.path.join(directory, "ca.pem"),
        cert=os.path.join(directory, "cert.pem"),
        key=os.path.join(directory, "key.pem"),
        combined=os.path.join(directory, "combined.pem"),
    )
    write_files(
        (paths.ca_cert, cert_pem(ca_cert)),
        (paths.cert, cert_pem(cert)),
        (paths.key, key_pem(key)),
        (paths.combined, cert_pem(cert) + key_pem(key)),
    )
    return paths
