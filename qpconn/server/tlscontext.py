"""The server's OpenSSL context, built by qpconn itself for STARTTLS and ``ssl:`` listeners.

Why not ``twisted.internet.ssl.CertificateOptions``: what it puts on the context changes
from release to release, and some of it breaks mail clients. Twisted 24.7 and later install
an ALPN select callback on every context that answers with nothing when no protocols are
configured, and a client that offers ALPN (``openssl s_client -alpn smtp``, Python's
``ssl`` with ``set_alpn_protocols``) then gets alert 80 instead of a session. Its session
cache is off by default and its cipher list includes static-RSA and CBC suites. So the
context is made here, with pyOpenSSL, every setting explicit, and Twisted only ever sees
a finished :class:`ServerTLS` (an ``IOpenSSLServerConnectionCreator``):

* no ALPN callback at all: OpenSSL then ignores the client's ALPN list, the handshake
  completes with no protocol selected (RFC 7301 §3.2 lets a server do so), whatever the
  Twisted release;
* TLS 1.2 at least (RFC 8996), and for TLS 1.2 only forward-secret AEAD suites
  (ECDHE/DHE with AES-GCM or ChaCha20-Poly1305); TLS 1.3 suites are all of that kind;
* session resumption through a server-side session cache (TLS 1.2 session ids, TLS 1.3
  stateful tickets) whose entries expire after ``tls_session_timeout``. A cache rather than
  stateless tickets: a ticket key lives as long as the process and whoever takes it reads
  every session resumed with it, while a cache entry is gone after its timeout;
* no compression (CRIME), no renegotiation (a client could make the server do a full
  handshake's work as often as it likes), the server's suite order.

The settings (``tls_ciphers``, ``tls_ciphersuites``, ``tls_min_version``,
``tls_session_timeout``, ``tls_dhparams``) are read once by :func:`read_tls_policy`, and a
value OpenSSL refuses is a ConfigError naming the file, at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from qpconn.config import ConfigError

if TYPE_CHECKING:
    from OpenSSL import SSL

    from qpconn.config import Config

__all__ = [
    "DEFAULT_CIPHERS",
    "MIN_VERSIONS",
    "KeyPair",
    "ServerTLS",
    "TLSPolicy",
    "load_key_pair",
    "load_server_tls",
    "openssl_reason",
    "read_tls_policy",
    "server_tls",
]

#: TLS 1.2 suites offered by default: ephemeral key exchange (forward secrecy) with an
#: AEAD cipher. No static RSA key exchange, no CBC, no anonymous or pre-shared-key suites.
#: (DHE is used only when ``tls_dhparams`` gives Diffie-Hellman parameters.)
DEFAULT_CIPHERS = (
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP:!DSS"
)

#: ``tls_min_version`` values, as OpenSSL names the versions
MIN_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")

#: seconds a session may be resumed; Postfix's ``smtpd_tls_session_cache_timeout`` default
DEFAULT_SESSION_TIMEOUT = 3600

#: a session id context names "sessions of this server" in the cache; any fixed value
#: will do since one process has one cache per context
_SESSION_ID_CONTEXT = b"qpconn-smtpd"


@dataclass(frozen=True)
class TLSPolicy:
    """What the server accepts in a handshake; shared by STARTTLS and ``ssl:`` listeners."""

    #: OpenSSL cipher string for TLS 1.2 and older (config ``tls_ciphers``)
    ciphers: str = DEFAULT_CIPHERS
    #: TLS 1.3 suites, colon-separated (config ``tls_ciphersuites``); None: OpenSSL's
    ciphersuites: str | None = None
    #: the oldest protocol version accepted (config ``tls_min_version``)
    min_version: str = "TLSv1.2"
    #: seconds a session stays resumable; 0: no resumption (config ``tls_session_timeout``)
    session_timeout: int = DEFAULT_SESSION_TIMEOUT
    #: PEM Diffie-Hellman parameters for the DHE suites (config ``tls_dhparams``)
    dh_params: str | None = None


def read_tls_policy(config: Config) -> TLSPolicy:
    """The policy from the config directory, checked by OpenSSL itself.

    Each value is applied to a scratch context, so a cipher string OpenSSL does not
    understand, or an unreadable parameters file, stops the server here instead of
    failing every handshake later.
    """
    timeout = config.get_int("tls_session_timeout", DEFAULT_SESSION_TIMEOUT)
    if timeout < 0:
        raise ConfigError(f"tls_session_timeout: {timeout} is negative")
    min_version = config.get("tls_min_version") or "TLSv1.2"
    if min_version not in MIN_VERSIONS:
        raise ConfigError(
            f"tls_min_version: {min_version!r} is not one of {', '.join(MIN_VERSIONS)}"
        )
    dh_params = config.get("tls_dhparams")
    policy = TLSPolicy(
        ciphers=config.get("tls_ciphers") or DEFAULT_CIPHERS,
        ciphersuites=config.get("tls_ciphersuites") or None,
        min_version=min_version,
        session_timeout=timeout,
        dh_params=config.path(dh_params) if dh_params else None,
    )
    if policy != TLSPolicy():  # the defaults are known to work; a scratch context costs
        _apply_policy(_new_context(), policy)
    return policy


def _openssl() -> Any:
    try:
        from OpenSSL import SSL
    except ImportError as exc:  # pragma: no cover - twisted[tls] is a dependency
        raise ConfigError(f"TLS needs pyOpenSSL (pip install 'twisted[tls]'): {exc}") from exc
    return SSL


def _new_context() -> SSL.Context:
    SSL = _openssl()
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION
        # TLS 1.2: resume from the session cache, not from tickets; TLS 1.3: the tickets
        # are stateful, i.e. references to cache entries (see the module docstring)
        | SSL.OP_NO_TICKET
    )
    # Idle sessions give their read and write buffers back (tens of KiB each).
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return context


def _apply_policy(context: SSL.Context, policy: TLSPolicy) -> None:
    """Put ``policy`` on ``context``; OpenSSL's refusals become ConfigErrors."""
    SSL = _openssl()
    versions = {
        "TLSv1": SSL.TLS1_VERSION,
        "TLSv1.1": SSL.TLS1_1_VERSION,
        "TLSv1.2": SSL.TLS1_2_VERSION,
        "TLSv1.3": SSL.TLS1_3_VERSION,
    }
    context.set_min_proto_version(versions[policy.min_version])
    try:
        context.set_cipher_list(policy.ciphers.encode("ascii", "replace"))
    except SSL.Error as exc:
        raise ConfigError(
            f"tls_ciphers: OpenSSL refuses {policy.ciphers!r}: {openssl_reason(exc)}"
        ) from None
    if policy.ciphersuites:
        if not hasattr(context, "set_tls13_ciphersuites"):
            raise ConfigError("tls_ciphersuites: setting the TLS 1.3 suites needs pyOpenSSL 25.2")
        try:
            context.set_tls13_ciphersuites(policy.ciphersuites.encode("ascii", "replace"))
        except SSL.Error as exc:
            raise ConfigError(
                f"tls_ciphersuites: OpenSSL refuses {policy.ciphersuites!r}: "
                f"{openssl_reason(exc)}"
            ) from None
    if policy.dh_params:
        if not os.path.isfile(policy.dh_params):
            raise ConfigError(f"tls_dhparams: no file {policy.dh_params!r}")
        try:
            context.load_tmp_dh(policy.dh_params.encode())
        except SSL.Error as exc:
            raise ConfigError(
                f"tls_dhparams: no Diffie-Hellman parameters in {policy.dh_params!r}: "
                f"{openssl_reason(exc)}"
            ) from None
    context.set_session_id(_SESSION_ID_CONTEXT)
    if policy.session_timeout:
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        context.set_timeout(policy.session_timeout)
    else:
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)


def openssl_reason(error: BaseException) -> str:
    """OpenSSL's own words from a pyOpenSSL ``SSL.Error``: ``"no shared cipher"``.

    pyOpenSSL carries the error queue as ``[(library, function, reason), ...]``; the
    reasons are what an administrator can look up. Anything else is its ``str()``.
    """
    queue = error.args[0] if error.args else None
    if isinstance(queue, list):
        reasons = [str(entry[-1]) for entry in queue if isinstance(entry, tuple) and entry[-1]]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    return str(error) or type(error).__name__


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """A finished server context; Twisted asks it for one OpenSSL connection per client.

    Given to ``transport.startTLS`` (STARTTLS) and to ``SSL4ServerEndpoint`` (``ssl:``).
    The context is never changed after the first connection (pyOpenSSL forbids it), so
    every session of a listener shares its session cache.
    """

    def __init__(self, context: SSL.Context, policy: TLSPolicy) -> None:
        self.context = context
        self.policy = policy

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """IOpenSSLServerConnectionCreator: a new server-side OpenSSL connection."""
        return _openssl().Connection(self.context, None)

    def getContext(self) -> SSL.Context:
        """The context, for callers of the older IOpenSSLContextFactory interface."""
        return self.context


@dataclass(frozen=True)
class KeyPair:
    """A certificate chain (leaf first) and its private key, read and checked."""

    chain: tuple[Any, ...]
    key: Any
    #: the setting that named the key file, for errors found later
    key_name: str = "tls_key"
    description: str = ""


def load_key_pair(
    cert_path: str,
    key_path: str | None,
    *,
    chain_path: str | None = None,
    names: tuple[str, str] = ("tls_cert", "tls_key"),
) -> KeyPair:
    """Read PEM files: the certificate (then its chain), the key; check that they fit.

    ``key_path`` None means the key is in the certificate file; ``chain_path`` is an extra
    file of chain certificates (``extraCertChain=`` of an ``ssl:`` listener). Errors are
    ConfigErrors starting with ``names`` (the setting that named the file). Separate from
    building the context so that an ``ssl:`` listener's files are checked before anything
    else is set up, and the context made once the config's policy is known.
    """
    from cryptography.hazmat.primitives import serialization

    cert_name, key_name = names
    key_path = key_path or cert_path
    chain = _certificates(cert_path, cert_name)
    if not chain:
        raise ConfigError(f"{cert_name}: no certificate in {cert_path!r}")
    if chain_path is not None:
        extra = _certificates(chain_path, "extraCertChain")
        if not extra:
            raise ConfigError(f"extraCertChain: no certificate in {chain_path!r}")
        chain += extra
    try:
        with open(key_path, "rb") as handle:
            key = serialization.load_pem_private_key(handle.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"{key_name}: cannot load a private key from {key_path!r}: {exc}"
        ) from exc
    description = f"{key_path!r} does not fit {cert_path!r}"
    if chain[0].public_key() != key.public_key():
        raise ConfigError(f"{key_name}: {description}: the public keys differ")
    return KeyPair(tuple(chain), key, key_name, description)


def server_tls(pair: KeyPair, policy: TLSPolicy) -> ServerTLS:
    """The finished context for ``pair`` under ``policy``."""
    SSL = _openssl()
    context = _new_context()
    # cryptography objects, as pyOpenSSL now wants them (its own X509/PKey are deprecated)
    context.use_certificate(pair.chain[0])
    try:
        context.use_privatekey(pair.key)
        context.check_privatekey()
    except (SSL.Error, TypeError, ValueError) as exc:
        raise ConfigError(f"{pair.key_name}: {pair.description}: {exc}") from exc
    for extra_cert in pair.chain[1:]:
        context.add_extra_chain_cert(extra_cert)
    _apply_policy(context, policy)
    return ServerTLS(context, policy)


def load_server_tls(
    cert_path: str,
    key_path: str | None,
    policy: TLSPolicy,
    *,
    chain_path: str | None = None,
    names: tuple[str, str] = ("tls_cert", "tls_key"),
) -> ServerTLS:
    """:func:`load_key_pair`, then :func:`server_tls`: a context from PEM files."""
    pair = load_key_pair(cert_path, key_path, chain_path=chain_path, names=names)
    return server_tls(pair, policy)


def _certificates(path: str, name: str) -> list[Any]:
    from cryptography import x509

    try:
        with open(path, "rb") as handle:
            return list(x509.load_pem_x509_certificates(handle.read()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot load a certificate from {path!r}: {exc}") from exc
