"""PROXY protocol (HAProxy v1/v2) on the Twisted side: who may send it, and what it changes.

The byte-level parser is :mod:`qpconn.core.proxy` (sans-I/O). This module holds what
needs policy rather than grammar: :class:`ProxySettings` (is the header required, from
which balancers is it believed, how long may it take), :func:`apply_proxy_info`, which
rewrites a :class:`~qpconn.mail.connection.Connection` from a parsed header, and
:class:`ProxyHeaderWait`, the protocol's wait for the header (until it is complete
nothing else happens: no lookup, no hook, no banner).

Why a whitelist: a PROXY header *replaces* the client address every later decision is
made on (relaying, rate limits, DNSBLs, the Received header). Believing it from anyone
would let every client claim any address, so only the configured balancers may send one,
and when the header is required every other peer is refused before anything is processed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qpconn.core.proxy import ProxyHeaderParser, ProxyInfo, ProxyProtocolError

if TYPE_CHECKING:
    from qpconn.mail.connection import Connection
    from qpconn.server.protocol import SMTPServerProtocol

__all__ = ["ProxySettings", "ProxyHeaderWait", "LOOPBACK", "apply_proxy_info", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Trusted when ``--proxy-protocol`` is given without ``--proxy-from``: a balancer on
#: this host is the only one that can be assumed without configuration.
LOOPBACK: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


def parse_networks(texts: Sequence[str]) -> tuple[Network, ...]:
    """CIDR strings (a bare address is a /32 or /128) as networks; ValueError on a typo.

    Host bits are allowed (``10.0.0.1/8`` means ``10.0.0.0/8``): administrators write
    both, and refusing to start over it helps nobody.
    """
    return tuple(ipaddress.ip_network(text.strip(), strict=False) for text in texts)


@dataclass
class ProxySettings:
    """Whether connections must start with a PROXY header, and whose headers are believed.

    A ``.tac`` file passes one to :func:`qpconn.app.service.make_service` (``proxy=``); the
    ``--proxy-protocol`` and ``--proxy-from`` options build one. The setting applies to
    every listener of the factory: give a listener that must not require the header its
    own factory.
    """

    #: require a PROXY header (v1 or v2) at the start of every connection
    enabled: bool = False
    #: CIDRs of the load balancers whose headers are believed; nobody else may connect
    trusted: Sequence[str] = LOOPBACK
    #: seconds the whole header may take to arrive; None takes config ``proxy_timeout`` (5)
    timeout: float | None = None
    #: peers on a unix socket are trusted: the socket's file permissions decide who
    #: may connect, and there is no address to check
    trust_unix: bool = True
    #: bound on the v2 header's variable part (addresses + TLVs), see ProxyHeaderParser
    max_v2_length: int = 4096
    _networks: tuple[Network, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Parsed once, here, so a bad CIDR stops the server at start, not at first use.
        self._networks = parse_networks(self.trusted)

    def trusts(self, ip: str | None) -> bool:
        """May a peer at ``ip`` (None: unix socket) send us a PROXY header?"""
        if ip is None:
            return self.trust_unix
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)


def _canonical(ip: str) -> str:
    """IPv4-mapped IPv6 as plain IPv4, as :func:`~qpconn.server.factory.address_parts` does."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def apply_proxy_info(connection: Connection, info: ProxyInfo) -> bool:
    """Make ``connection`` describe the proxied client; return True if it changed.

    LOCAL (the balancer's own health check), UNKNOWN and headers without a usable
    address keep the real peer, as the specification demands. The balancer's own
    address and what it said are kept in ``connection.notes["proxy"]`` for logs and
    plugins that want to know a balancer was involved.
    """
    connection.notes["proxy"] = {
        "version": info.version,
        "command": info.command,
        "peer": (connection.remote_ip, connection.remote_port),
    }
    if info.command != "PROXY" or info.source is None:
        return False
    connection.remote_ip = _canonical(info.source[0])
    connection.remote_port = info.source[1]
    if info.destination is not None:
        connection.local_ip = _canonical(info.destination[0])
        connection.local_port = info.destination[1]
    return True


class ProxyHeaderWait:
    """A trusted balancer's connection until its PROXY header is complete.

    Fed every byte that arrives; once the header is in, its addresses replace the
    socket's and the session begins with what followed it. A malformed header, or none
    complete within ``proxy_timeout``, refuses the connection
    (:meth:`~qpconn.server.protocol.SMTPServerProtocol.refuse`: one log line, nothing run).
    """

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self.protocol = protocol
        factory = protocol.factory
        proxy = factory.proxy
        self.parser = ProxyHeaderParser(proxy.max_v2_length)
        self.timer = factory.clock.callLater(
            proxy.timeout or 5.0, protocol.refuse, "no complete PROXY header in time"
        )

    def feed(self, data: bytes) -> None:
        """More bytes of the header (and maybe what follows it)."""
        protocol = self.protocol
        try:
            found = self.parser.feed(data)
        except ProxyProtocolError as exc:
            protocol.refuse(f"bad PROXY header: {exc}")
            return
        if found is None:
            return
        info, rest = found
        self.cancel()
        conn = protocol.commands.connection
        balancer = f"{conn.remote_ip}:{conn.remote_port}"
        apply_proxy_info(conn, info)
        protocol.log.debug(
            "{conn_id} PROXY v{version} {command} from balancer {balancer}",
            version=info.version,
            command=info.command,
            balancer=balancer,
            **protocol.log_context(),
        )
        # Early talk that came with the header waits in the core until the greeting is
        # out; it must be buffered before the session begins, which may greet at once.
        protocol.session.receive_data(rest)
        protocol.begin_session()

    def cancel(self) -> None:
        """No more waiting: the header is in, or the connection is refused or gone."""
        if self.timer.active():
            self.timer.cancel()
