"""Verified STARTTLS to a next hop (``starttls=required``), with failures named as such.

Twisted's ``optionsForClientTLS`` verifies well, but when verification fails the client
only sees the connection end: OpenSSL's "certificate verify failed" at best, and
``queue/smtp-forward`` used to tell its own client "connection closed by the next hop",
which sends an administrator looking for a crash at the other end instead of at a
certificate. :class:`VerifyingClientTLS` makes the client context itself and verifies in
its own callback, which keeps what went wrong (OpenSSL's chain error at its depth, or a
certificate that does not name the host); :func:`tls_failure_text` turns that, or the TLS
error the connection ended with, into the reason logged and put in the 451 reply.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

if TYPE_CHECKING:
    from OpenSSL import SSL
    from twisted.python.failure import Failure

__all__ = ["VerifyingClientTLS", "tls_failure_text", "verify_error_text"]

#: OpenSSL's X509_V_ERR_* codes a next hop's certificate commonly fails with
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    4: "unable to decrypt certificate's signature",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    13: "format error in certificate's notBefore field",
    14: "format error in certificate's notAfter field",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
}


def verify_error_text(code: int) -> str:
    """OpenSSL's words for a verification error code (``20``: unable to get local ...)."""
    return _VERIFY_ERRORS.get(code, f"X.509 verification error {code}")


def _subject(cert: Any) -> str:
    try:
        return str(cert.to_cryptography().subject.rfc4514_string()) or "no subject"
    except Exception:  # a certificate cryptography cannot parse still needs a name
        return "unreadable subject"


class VerifyingClientTLS:
    """Client TLS that trusts ``ca_file`` (None: the system's CAs) and checks ``hostname``.

    One context per destination (its pool keeps it), shared by its connections. Each
    connection's STARTTLS goes through :meth:`reporting_to`, so that the first
    verification failure lands on that connection's protocol (``tls_verify_failure``),
    which can then say why the connection ended.
    """

    def __init__(self, hostname: str, ca_file: str | None = None) -> None:
        from OpenSSL import SSL

        self.hostname = hostname
        try:
            self._ip: Any = ipaddress.ip_address(hostname)
        except ValueError:
            self._ip = None
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)  # RFC 8996
        context.set_options(SSL.OP_NO_COMPRESSION)
        if ca_file:
            context.load_verify_locations(ca_file.encode())
        else:
            context.set_default_verify_paths()
        context.set_verify(SSL.VERIFY_PEER)
        self._context = context

    def reporting_to(self, protocol: Any) -> _ReportingClientTLS:
        """The connection creator for one STARTTLS whose failures ``protocol`` keeps."""
        return _ReportingClientTLS(self, protocol)

    def connection(self, protocol: Any) -> SSL.Connection:
        """A client connection that verifies the next hop and reports to ``protocol``."""
        from OpenSSL import SSL

        connection = SSL.Connection(self._context, None)
        if self._ip is None:  # RFC 6066 §3: SNI names hosts, never addresses
            connection.set_tlsext_host_name(self.hostname.encode("idna"))
        connection.set_verify(SSL.VERIFY_PEER, self._callback(protocol))
        return connection

    def _callback(self, protocol: Any) -> Any:
        def record(text: str) -> None:
            if protocol is not None and getattr(protocol, "tls_verify_failure", None) is None:
                protocol.tls_verify_failure = text

        def verify(connection: Any, cert: Any, code: int, depth: int, ok: int) -> bool:
            # Exceptions must not escape an OpenSSL callback: they would be lost.
            try:
                if not ok:
                    record(f"{verify_error_text(code)} (depth {depth}, {_subject(cert)})")
                    return False
                if depth == 0:
                    mismatch = self._identity_mismatch(cert)
                    if mismatch is not None:
                        record(mismatch)
                        return False
                return True
            except Exception as exc:
                record(f"could not check the certificate: {exc}")
                return False

        return verify

    def _identity_mismatch(self, cert: Any) -> str | None:
        """None if the leaf certificate names our host (RFC 6125), else why not."""
        from service_identity import CertificateError, VerificationError
        from service_identity.cryptography import (
            verify_certificate_hostname,
            verify_certificate_ip_address,
        )

        try:
            if self._ip is not None:
                verify_certificate_ip_address(cert.to_cryptography(), str(self._ip))
            else:
                verify_certificate_hostname(cert.to_cryptography(), self.hostname)
        except (VerificationError, CertificateError):
            return f"the certificate ({_subject(cert)}) does not name {self.hostname}"
        return None


@implementer(IOpenSSLClientConnectionCreator)
class _ReportingClientTLS:
    """What ``startTLS`` gets: :class:`VerifyingClientTLS` bound to one protocol."""

    def __init__(self, verifier: VerifyingClientTLS, protocol: Any) -> None:
        self._verifier = verifier
        self._protocol = protocol

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """IOpenSSLClientConnectionCreator: a connection that verifies the next hop."""
        return self._verifier.connection(self._protocol)


def tls_failure_text(reason: Failure | None, verify_failure: str | None) -> str:
    """Why TLS to the next hop failed, for the log and our reply's text."""
    if verify_failure:
        return f"TLS certificate verification failed: {verify_failure}"
    from OpenSSL.SSL import Error as SSLError  # starttls= needs pyOpenSSL (forward.py)

    error = reason.value if reason is not None else None
    if isinstance(error, SSLError):
        from qpconn.server.tlscontext import openssl_reason

        text = openssl_reason(error)
        if "certificate verify failed" in text:
            return f"TLS certificate verification failed: {text}"
        return f"TLS handshake with the next hop failed: {text}"
    return "TLS handshake with the next hop failed: connection closed by the next hop"
