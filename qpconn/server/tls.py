"""TLS for the Twisted adapter: the server's certificate, STARTTLS, implicit TLS.

What needs a reactor and OpenSSL lives here; the SMTP side of STARTTLS (the 220, the
state reset) is in :mod:`qpconn.smtp.security` and the byte-level rule (nothing sent
after STARTTLS and before the handshake is ever read) in :mod:`qpconn.core.states`.

* :func:`load_tls_options` reads ``tls_cert``/``tls_key`` once, at start-up, so a wrong
  path or a key that does not match the certificate stops the server instead of failing
  every STARTTLS later. The context itself, and the TLS policy (versions, suites, session
  resumption, no ALPN), are :mod:`qpconn.server.tlscontext`'s; ``ssl:`` listeners get the
  same through :mod:`qpconn.server.tlsendpoint`.
* :class:`TLSLayer` (owned by the protocol) starts TLS right after the 220 reply is
  written, bounds the handshake in time, and on ``handshakeCompleted`` tells the SMTP
  side, with the version and cipher. On an ``ssl:`` listener (implicit TLS, RFC 8314)
  the session itself (lookups, hooks, greeting) waits for the handshake, so every plugin
  sees ``connection.tls`` from the ``connect`` hook on. A handshake that fails, on either
  kind of listener, is logged with the client's address and OpenSSL's reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall

from qpconn.config import ConfigError
from qpconn.core.session import State
from qpconn.server.tlscontext import (
    ServerTLS,
    TLSPolicy,
    load_server_tls,
    openssl_reason,
    read_tls_policy,
)

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from qpconn.config import Config
    from qpconn.server.protocol import SMTPServerProtocol

__all__ = [
    "TLSLayer",
    "handshake_failure_reason",
    "load_tls_options",
    "tls_details",
    "tls_from_config",
]


def load_tls_options(
    cert_path: str, key_path: str | None = None, policy: TLSPolicy | None = None
) -> ServerTLS:
    """The STARTTLS context from PEM files: the certificate (then its chain), the key.

    ``key_path`` None means the key is in the certificate file. ``policy`` (versions,
    suites, session resumption) defaults to :class:`~qpconn.server.tlscontext.TLSPolicy`:
    TLS 1.2 at least, forward-secret AEAD suites only. The context is qpconn's own
    (:mod:`qpconn.server.tlscontext` says why). Errors are ConfigErrors naming the file.
    """
    return load_server_tls(cert_path, key_path, policy or TLSPolicy())


def tls_from_config(config: Config) -> ServerTLS | None:
    """The STARTTLS context from config ``tls_cert``/``tls_key``, or None when unset.

    The TLS settings (``tls_ciphers``, ``tls_min_version`` ...) are checked even without
    a certificate: an ``ssl:`` listener uses them too, and a typo must stop the server.
    """
    cert = config.get("tls_cert")
    key = config.get("tls_key")
    policy = read_tls_policy(config)
    if not cert:
        if key:
            raise ConfigError("tls_key is set but tls_cert is not")
        return None
    return load_tls_options(config.path(cert), config.path(key) if key else None, policy)


try:  # looked up once: _ssl_handle runs for every new connection
    from OpenSSL.SSL import Connection as _SSL_CONNECTION
    from OpenSSL.SSL import Error as _SSL_ERROR
except ImportError:  # pragma: no cover
    _SSL_CONNECTION = None
    _SSL_ERROR = None


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


def handshake_failure_reason(reason: Failure | None) -> str:
    """Why a handshake ended, in OpenSSL's words when it has any."""
    from twisted.internet.error import ConnectionDone, ConnectionLost

    error = reason.value if reason is not None else None
    if error is None:
        return "connection closed"
    if _SSL_ERROR is not None and isinstance(error, _SSL_ERROR):
        return openssl_reason(error)
    if isinstance(error, ConnectionDone | ConnectionLost):
        # Twisted reports a TCP close in the middle of a TLS handshake as either
        return "the connection closed before the handshake completed"
    return str(error).strip() or type(error).__name__


class TLSLayer:
    """STARTTLS and implicit TLS for one session of
    :class:`~qpconn.server.protocol.SMTPServerProtocol`, which owns it.

    The protocol is the transport's IHandshakeListener and hands the news on to
    :meth:`handshake_completed`; this class decides what follows: the session starts (an
    ``ssl:`` listener) or starts over on a clone of the connection (after STARTTLS).
    """

    # One per session, though most never use TLS: fields only, no attribute dict.
    __slots__ = ("_done", "_failure_logged", "_implicit", "_starting", "_timer", "protocol")

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self.protocol = protocol
        self._timer: IDelayedCall | None = None
        #: startTLS() was called (after the 220 to STARTTLS went out)
        self._starting = False
        #: an ssl: listener: the session starts when the handshake is done
        self._implicit = False
        self._done = False
        #: the handshake's end was logged already (its timeout): the close says nothing more
        self._failure_logged = False

    def handshake_pending(self) -> bool:
        """True (and wait) on an implicit-TLS transport whose handshake is not done."""
        if self._done or _ssl_handle(self.protocol.transport) is None:
            return False
        if not self._implicit:
            self._implicit = True
            self._bound_handshake()
        return True

    def after_flush(self) -> None:
        """After the 220 to STARTTLS is written: switch the transport to TLS, once."""
        protocol = self.protocol
        if self._starting or protocol.session.state is not State.STARTTLS:
            return
        self._starting = True
        # The handshake has its own bound; the idle timer would write a 421 into a TLS
        # layer that cannot send it yet.
        protocol.setTimeout(None)
        self._bound_handshake()
        protocol.transport.startTLS(protocol.factory.security.tls)

    def _bound_handshake(self) -> None:
        factory = self.protocol.factory
        self._timer = factory.clock.callLater(factory.timeout or 300.0, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        self._timer = None
        self._failure_logged = True
        self._log_failure("timed out")
        self.protocol.transport.abortConnection()

    def _log_failure(self, why: str) -> None:
        protocol = self.protocol
        protocol.log.info(
            "{conn_id} TLS handshake failed from {remote_ip}:{remote_port}: {reason}",
            remote_port=protocol.commands.connection.remote_port,
            reason=why,
            **protocol.commands.log_context(),
        )

    def cancel_timer(self) -> None:
        """The session is over: no handshake deadline any more."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connection_lost(self, reason: Failure | None) -> None:
        """The connection ended: if a handshake was under way, log why it failed.

        A failed handshake ends the connection with the TLS layer's error as ``reason``;
        OpenSSL's words for it ("no shared cipher", "unsupported protocol", "tlsv1 alert
        unknown ca") are what an administrator needs to tell a scanner from a client that
        cannot talk to us, so they are logged with the client's address, for STARTTLS and
        ``ssl:`` alike.
        """
        if self._done or self._failure_logged or not (self._starting or self._implicit):
            return
        self._failure_logged = True
        self._log_failure(handshake_failure_reason(reason))

    def handshake_completed(self) -> None:
        """The TLS layer finished its handshake: tell the handlers, then go on."""
        self.cancel_timer()
        if self._done:
            return  # a renegotiation: nothing starts over
        self._done = True
        protocol = self.protocol
        details = tls_details(protocol.transport)
        if self._implicit:
            protocol.commands.tls_established(details)
            protocol.begin_session()
            return
        if self._starting:
            protocol.commands.tls_established(details)
            protocol.setTimeout(protocol.factory.timeout)
