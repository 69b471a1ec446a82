"""``ssl:`` listeners (implicit TLS, RFC 8314) with qpconn's own TLS context.

Twisted's ``ssl:`` endpoint parser builds a ``CertificateOptions`` context, with the
ALPN callback, cipher list and disabled session cache that :mod:`qpconn.server.tlscontext`
exists to avoid. So :func:`parse_ssl_listen` reads an ``ssl:`` endpoint string itself, with
Twisted's syntax and argument names (``ssl:465:privateKey=key.pem:certKey=cert.pem``,
``interface=``, ``backlog=``, ``extraCertChain=``, ``dhParameters=``; ``\\`` escapes the
next character), and :func:`ssl_endpoint` makes the same ``SSL4ServerEndpoint`` Twisted
would, around a context built under the config's TLS policy. Other endpoint kinds go
to ``serverFromString`` untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from twisted.internet.endpoints import SSL4ServerEndpoint

from qpconn.server.tlscontext import KeyPair, TLSPolicy, load_key_pair, server_tls

__all__ = [
    "ImplicitTLSListen",
    "load_listen_files",
    "parse_ssl_listen",
    "split_description",
    "ssl_endpoint",
]

_PREFIX = "ssl:"


@dataclass(frozen=True)
class ImplicitTLSListen:
    """What an ``ssl:`` endpoint string asks for (Twisted's argument names in comments)."""

    port: int
    #: ``interface=``: the address to bind; "" is every IPv4 address
    interface: str = ""
    backlog: int = 50
    #: ``privateKey=``: PEM key, and the certificate too when ``certKey=`` is not given
    private_key: str = "server.pem"
    #: ``certKey=``: PEM certificate (then, optionally, its chain)
    cert: str | None = None
    #: ``extraCertChain=``: more chain certificates
    chain: str | None = None
    #: ``dhParameters=``: PEM Diffie-Hellman parameters (else config ``tls_dhparams``)
    dh_params: str | None = None


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """An endpoint string's positional and keyword arguments, by Twisted's rules.

    ``:`` separates arguments, the first ``=`` in one makes it a keyword argument, and
    a backslash takes the next character literally (``interface=\\:\\:1``).
    """
    positional: list[str] = []
    keywords: dict[str, str] = {}
    current: list[str] = []
    key: str | None = None
    escaped = False

    def finish() -> None:
        if key is None:
            positional.append("".join(current))
        else:
            keywords[key] = "".join(current)

    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            finish()
            current, key = [], None
        elif char == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(char)
    finish()
    return positional, keywords


def parse_ssl_listen(description: str) -> ImplicitTLSListen | None:
    """The ``ssl:`` listener an endpoint string describes; None for any other kind.

    A malformed string raises ValueError, as ``serverFromString`` would, before any file
    is read. ``sslmethod=`` is refused: the protocol versions are the config's
    ``tls_min_version``, the same for every listener.
    """
    if not description.startswith(_PREFIX):
        return None
    positional, keywords = split_description(description[len(_PREFIX) :])
    if "port" in keywords:
        positional.insert(0, keywords.pop("port"))
    if len(positional) != 1:
        raise ValueError(f"{description!r}: an ssl: endpoint takes one port number")
    if "sslmethod" in keywords:
        raise ValueError(
            f"{description!r}: sslmethod= is not supported; the config setting "
            "tls_min_version sets the oldest TLS version for every listener"
        )
    names = {
        "interface": "interface",
        "backlog": "backlog",
        "privateKey": "private_key",
        "certKey": "cert",
        "extraCertChain": "chain",
        "dhParameters": "dh_params",
    }
    unknown = sorted(set(keywords) - set(names))
    if unknown:
        raise ValueError(
            f"{description!r}: unknown ssl: argument {', '.join(unknown)} "
            f"(known: port, {', '.join(names)})"
        )
    values: dict[str, Any] = {names[key]: value for key, value in keywords.items()}
    try:
        port = int(positional[0])
        if "backlog" in values:
            values["backlog"] = int(values["backlog"])
    except ValueError:
        raise ValueError(f"{description!r}: port and backlog must be numbers") from None
    if not 0 <= port < 65536:
        raise ValueError(f"{description!r}: port {port} out of range")
    return ImplicitTLSListen(port=port, **values)


def load_listen_files(listen: ImplicitTLSListen) -> KeyPair:
    """The listener's certificate and key, read and checked (a bad file: ConfigError)."""
    return load_key_pair(
        listen.cert or listen.private_key,
        listen.private_key,
        chain_path=listen.chain,
        names=("certKey" if listen.cert else "privateKey", "privateKey"),
    )


def ssl_endpoint(
    reactor: Any, listen: ImplicitTLSListen, policy: TLSPolicy, pair: KeyPair | None = None
) -> SSL4ServerEndpoint:
    """The listening endpoint under ``policy``; ``pair`` is :func:`load_listen_files`'s
    result when the files were read already (else they are read now)."""
    if listen.dh_params:
        policy = dataclasses.replace(policy, dh_params=listen.dh_params)
    tls = server_tls(pair or load_listen_files(listen), policy)
    return SSL4ServerEndpoint(
        reactor, listen.port, tls, backlog=listen.backlog, interface=listen.interface
    )
