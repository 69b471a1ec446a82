"""Connections to one next hop, opened on demand and kept for the next message.

Opening a connection costs a TCP handshake, the next hop's greeting (often delayed on
purpose by MTAs), an EHLO and maybe a TLS handshake: several round trips per message.
The pool keeps up to ``size`` idle connections per destination; a message takes one,
says RSET (which also proves the connection still works) and gives it back when done.
A connection that failed in any way, that the next hop closed, or that stayed idle for
``idle_timeout`` seconds is closed instead of reused. The pool never makes a message
wait for a busy connection: when none is idle a new one is opened, so a burst is as
parallel as the sessions feeding it, and only ``size`` of them are kept afterwards.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger

from qpconn.client.names import resolving_reactor
from qpconn.client.smtp import NextHopError, ReplyProtocol, SMTPClient
from qpconn.client.tlsverify import VerifyingClientTLS

__all__ = ["ConnectionPool", "Destination", "STARTTLS_MODES"]

STARTTLS_MODES = ("no", "yes", "required")


@dataclass(frozen=True)
class Destination:
    """Where a forwarding plugin delivers: a TCP host and port, or a Unix socket path."""

    host: str | None = None
    port: int = 25
    path: str | None = None
    lmtp: bool = False
    #: no: never; yes: when offered, unverified (as Postfix's ``may``); required: offered
    #: and the certificate verified for ``host`` (against ``tls_ca`` or the system's CAs)
    starttls: str = "no"
    tls_ca: str | None = None

    @property
    def label(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"

    def endpoint(
        self, reactor: Any, timeout: float, resolver: Any = None
    ) -> IStreamClientEndpoint:
        """How to connect; a host name is resolved by ``resolver`` (an ``IResolver``)
        when given, else by the system (:mod:`qpconn.client.names`)."""
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        assert self.host is not None
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            named = resolving_reactor(reactor, resolver)
            return HostnameEndpoint(named, self.host.encode("idna"), self.port, timeout)
        cls = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
        return cls(reactor, self.host, self.port, timeout=timeout)


class ConnectionPool:
    """Idle connections to one destination; see the module docstring."""

    log = Logger(namespace="qpconn.client.pool")

    def __init__(
        self,
        destination: Destination,
        *,
        helo: str,
        reactor: Any,
        size: int = 2,
        idle_timeout: float = 30.0,
        connect_timeout: float = 30.0,
        resolver: Any = None,
    ) -> None:
        self.destination = destination
        #: an IResolver for the destination's host name (``--dns-server``), or None
        self.resolver = resolver
        self.helo = helo
        self.reactor = reactor
        self.size = size
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._idle: list[tuple[SMTPClient, IDelayedCall]] = []
        self._trigger: Any = None
        #: the client TLS context for STARTTLS, made with the first connection that needs it
        self._tls: Any = None
        self.closed = False
        #: connections opened so far (logs and tests)
        self.opened = 0

    async def acquire(self) -> SMTPClient:
        """A ready connection: an idle one that answers RSET, else a new one."""
        while self._idle:
            client, timer = self._idle.pop()
            if timer.active():
                timer.cancel()
            if client.usable and await client.reset():
                return client
            client.close()
        return await self.connect()

    async def connect(self) -> SMTPClient:
        """Open, read the greeting, EHLO/LHLO, and STARTTLS as the destination asks."""
        dest = self.destination
        protocol = ReplyProtocol()
        try:
            endpoint = dest.endpoint(self.reactor, self.connect_timeout, self.resolver)
            await connectProtocol(endpoint, protocol)
        except defer.CancelledError:
            raise
        except Exception as exc:
            raise NextHopError(f"cannot connect to {dest.label}: {_describe(exc)}") from exc
        self.opened += 1
        self._watch_shutdown()
        # Commands and the final dot are small writes after larger ones: with Nagle's
        # algorithm each waits for the peer's delayed ACK (~40 ms a message).
        set_nodelay = getattr(protocol.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        client = SMTPClient(protocol, lmtp=dest.lmtp, label=dest.label)
        try:
            await client.greet(self.helo)
            await self._maybe_starttls(client)
        except BaseException:
            client.close()
            raise
        return client

    async def _maybe_starttls(self, client: SMTPClient) -> None:
        mode = self.destination.starttls
        if mode == "no":
            return
        if "STARTTLS" not in client.extensions:
            if mode == "required":
                raise NextHopError(f"{self.destination.label} does not offer STARTTLS")
            return
        if self._tls is None:  # one context for every connection to this destination
            self._tls = tls_options(self.destination)
        tls = self._tls
        if isinstance(tls, VerifyingClientTLS):
            tls = tls.reporting_to(client.protocol)  # why a certificate failed: its reason
        await client.starttls(tls, self.helo)

    def release(self, client: SMTPClient, reuse: bool = True) -> None:
        """Give a connection back after a message; broken or surplus ones are closed."""
        if not reuse or not client.usable or self.closed or len(self._idle) >= self.size:
            defer.Deferred.fromCoroutine(client.quit())
            return
        timer = self.reactor.callLater(self.idle_timeout, self._expire, client)
        self._idle.append((client, timer))

    def _expire(self, client: SMTPClient) -> None:
        self._idle = [(c, t) for c, t in self._idle if c is not client]
        defer.Deferred.fromCoroutine(client.quit())

    def close(self) -> defer.Deferred[Any]:
        """QUIT every idle connection; later releases close theirs. Fires when done."""
        self.closed = True
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, AttributeError):
                pass
            self._trigger = None
        idle, self._idle = self._idle, []
        quits = []
        for client, timer in idle:
            if timer.active():
                timer.cancel()
            quits.append(
                defer.Deferred.fromCoroutine(client.quit()).addTimeout(2.0, self.reactor)
            )
        return defer.DeferredList(quits, consumeErrors=True)

    def _watch_shutdown(self) -> None:
        """QUIT idle connections while the reactor shuts down (after the sessions drained:
        the server's own stop runs in the 'before' phase, this in 'during')."""
        if self._trigger is None and hasattr(self.reactor, "addSystemEventTrigger"):
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.close)


def tls_options(destination: Destination) -> Any:
    """The client TLS settings for STARTTLS (needs pyOpenSSL, ``twisted[tls]``)."""
    from twisted.internet import ssl

    if destination.starttls != "required":
        # Opportunistic: encrypt against passive listeners, accept any certificate.
        return ssl.CertificateOptions()
    # Verified against tls_ca (else the system's CAs) and for the host's name, by a
    # context that remembers why a certificate failed (qpconn.client.tlsverify).
    return VerifyingClientTLS(destination.host or "localhost", destination.tls_ca)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().rstrip(".")
    return text or type(exc).__name__
