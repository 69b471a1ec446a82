"""TLS for the Twisted adapter: the server's certificate, STARTTLS, implicit TLS.

What needs a reactor and OpenSSL lives here; the SMTP side of STARTTLS (the 220, the
state reset) is in :mod:`qpconn.smtp.security` and the byte-level rule (nothing sent
after STARTTLS and before the handshake is ever read) in :mod:`qpconn.core.states`.

* :func:`load_tls_options` reads ``tls_cert``/``tls_key`` once, at start-up, so a wrong
  path or a key that does not match the certificate stops the server instead of failing
  every STARTTLS later.
* :class:`TLSAdapter` (mixed into the protocol) starts TLS right after the 220 reply is
  written, bounds the handshake in time, and on ``handshakeCompleted`` tells the SMTP
  side, with the version and cipher. On an ``ssl:`` listener (implicit TLS, RFC 8314)
  the session itself (lookups, hooks, greeting) waits for the handshake, so every plugin
  sees ``connection.tls`` from the ``connect`` hook on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.logger import Logger
from zope.interface import implementer

from qpconn.config import ConfigError

if TYPE_CHECKING:
    from qpconn.config import Config
    from qpconn.core.session import ServerSession
    from qpconn.server.factory import SMTPFactory

__all__ = ["TLSAdapter", "load_tls_options", "tls_details", "tls_from_config"]


def load_tls_options(cert_path: str, key_path: str | None = None) -> Any:
    """A server context factory from PEM files: the certificate (then its chain), the key.

    ``key_path`` None means the key is in the certificate file. TLS 1.2 is the minimum
    (RFC 8996 retired the older versions). Errors are ConfigErrors naming the file.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from twisted.internet import ssl
    except ImportError as exc:  # pragma: no cover - twisted[tls] is a dependency
        raise ConfigError(
            f"tls_cert: TLS needs pyOpenSSL (pip install 'twisted[tls]'): {exc}"
        ) from exc
    key_path = key_path or cert_path
    try:
        with open(cert_path, "rb") as handle:
            chain = x509.load_pem_x509_certificates(handle.read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tls_cert: cannot load a certificate from {cert_path!r}: {exc}") from exc
    try:
        with open(key_path, "rb") as handle:
            key = serialization.load_pem_private_key(handle.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"tls_key: cannot load a private key from {key_path!r}: {exc}") from exc
    if not chain:
        raise ConfigError(f"tls_cert: no certificate in {cert_path!r}")
    # cryptography objects, as pyOpenSSL now wants them (its own X509/PKey are deprecated)
    options = ssl.CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=chain[1:],  # type: ignore[arg-type]
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()  # checks that the key belongs to the certificate
    except Exception as exc:
        raise ConfigError(f"tls_key: {key_path!r} does not fit {cert_path!r}: {exc}") from exc
    return options


def tls_from_config(config: Config) -> Any:
    """The STARTTLS context from config ``tls_cert``/``tls_key``, or None when unset."""
    cert = config.get("tls_cert")
    key = config.get("tls_key")
    if not cert:
        if key:
            raise ConfigError("tls_key is set but tls_cert is not")
        return None
    return load_tls_options(config.path(cert), config.path(key) if key else None)


try:  # looked up once: _ssl_handle runs for every new connection
    from OpenSSL.SSL import Connection as _SSL_CONNECTION
except ImportError:  # pragma: no cover
    _SSL_CONNECTION = None


def _ssl_handle(transport: Any) -> Any:
    """The OpenSSL connection under ``transport``, or None for a clear-text one."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None or _SSL_CONNECTION is None:
        return None
    handle = get_handle()
    return handle if isinstance(handle, _SSL_CONNECTION) else None



def tls_details(transport: Any) -> dict[str, str]:
    """``{"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "bits": "256"}``."""
    handle = _ssl_handle(transport)
    if handle is None:
        return {}
    details = {
        "version": handle.get_protocol_version_name() or "TLS",
        "cipher": handle.get_cipher_name() or "unknown",
    }
    bits = handle.get_cipher_bits()
    if bits:
        details["bits"] = str(bits)
    return details


@implementer(IHandshakeListener)
class TLSAdapter:
    """STARTTLS and implicit TLS for :class:`~qpconn.server.protocol.SMTPServerProtocol`."""

    log: Logger
    factory: SMTPFactory
    transport: Any
    session: ServerSession
    _tls_timer: IDelayedCall | None = None
    #: startTLS() was called (after the 220 to STARTTLS went out)
    _tls_starting = False
    #: an ssl: listener: the session starts when the handshake is done
    _tls_implicit = False
    _tls_done = False

    if TYPE_CHECKING:  # provided by the protocol and SMTPCommands

        def _begin(self) -> None: ...
        def tls_established(self, details: dict[str, str]) -> None: ...
        def setTimeout(self, period: float | None) -> float | None: ...
        def log_context(self) -> dict[str, Any]: ...

    def tls_handshake_pending(self) -> bool:
        """True (and wait) on an implicit-TLS transport whose handshake is not done."""
        if self._tls_done or _ssl_handle(self.transport) is None:
            return False
        if not self._tls_implicit:
            self._tls_implicit = True
            self._tls_bound_handshake()
        return True

    def tls_after_flush(self) -> None:
        """After the 220 to STARTTLS is written: switch the transport to TLS, once."""
        from qpconn.core.session import State

        if self._tls_starting or self.session.state is not State.STARTTLS:
            return
        self._tls_starting = True
        # The handshake has its own bound; the idle timer would write a 421 into a TLS
        # layer that cannot send it yet.
        self.setTimeout(None)
        self._tls_bound_handshake()
        self.transport.startTLS(self.factory.security.tls)

    def _tls_bound_handshake(self) -> None:
        self._tls_timer = self.factory.clock.callLater(
            self.factory.timeout or 300.0, self._tls_handshake_timeout
        )

    def _tls_handshake_timeout(self) -> None:
        self._tls_timer = None
        self.log.info("{conn_id} TLS handshake timed out", **self.log_context())
        self.transport.abortConnection()

    def _tls_cancel_timer(self) -> None:
        if self._tls_timer is not None and self._tls_timer.active():
            self._tls_timer.cancel()
        self._tls_timer = None

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS layer finished its handshake."""
        self._tls_cancel_timer()
        if self._tls_done:
            return  # a renegotiation: nothing starts over
        self._tls_done = True
        details = tls_details(self.transport)
        if self._tls_implicit:
            self.tls_established(details)
            self._begin()
            return
        if self._tls_starting:
            self.tls_established(details)
            self.setTimeout(self.factory.timeout)
