"""A minimal RFC 1413 ident client.

Twisted ships ``twisted.protocols.ident.IdentClient``, but on Python 3 it
writes ``str`` to the transport and splits ``bytes`` with ``str``, so it
cannot work; this module replaces it.

The answer comes from the peer, i.e. from whoever we are talking to, so it
is treated as hostile: one line, bounded in size, strictly parsed, ports
checked, and the user id reduced to a conservative character set before it
may reach a Received header or a log line.  Like the DNS lookups, the whole
exchange is bounded in time and never errbacks.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IConnector
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure

#: RFC 1413 limits replies to 1000 characters; anything longer is abuse.
MAX_REPLY = 1000
#: Longest user id we pass on; real ones are short, long ones are noise.
MAX_USERID = 64

_PORTS = re.compile(r"\s*(\d{1,5})\s*,\s*(\d{1,5})\s*\Z")
# Characters that would let a user id escape a header comment or impersonate
# an address: '@' (looks like user@host), '(' ')' '\' (comment syntax in
# "(ident=...)"), '[' ']' (address literals).
_FORBIDDEN = frozenset("@()[]\\")


def sanitize_userid(raw: str) -> str | None:
    """Return the trimmed user id if it is safe to log and quote, else None."""
    text = raw.strip(" \t")
    if not text or len(text) > MAX_USERID:
        return None
    for char in text:
        if not " " <= char <= "~" or char in _FORBIDDEN:
            return None
    return text


def parse_ident_reply(line: bytes, remote_port: int, local_port: int) -> str | None:
    """Parse one reply line (without its line ending) into a user id.

    Returns None for ERROR replies, replies about other port pairs (a
    confused or lying server), malformed lines and unsafe user ids.
    """
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = text.split(":", 3)
    if len(parts) != 4:
        return None  # ERROR replies have three fields; garbage has fewer
    ports, kind, os_field, userid = parts
    match = _PORTS.match(ports)
    if match is None or (int(match[1]), int(match[2])) != (remote_port, local_port):
        return None
    if kind.strip().upper() != "USERID" or not os_field.strip():
        return None
    return sanitize_userid(userid)


class _IdentProtocol(Protocol):
    """Send the query, read one line, hand it to the factory."""

    factory: _IdentFactory

    def __init__(self) -> None:
        self._buffer = b""

    def connectionMade(self) -> None:
        self.factory.protocol_instance = self
        query = f"{self.factory.remote_port} , {self.factory.local_port}\r\n"
        self.transport.write(query.encode("ascii"))

    def dataReceived(self, data: bytes) -> None:
        if self.factory.done:
            return
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_REPLY:
                self.factory.finish(None)
            return
        line = self._buffer[:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > MAX_REPLY:
            self.factory.finish(None)
            return
        self.factory.finish(
            parse_ident_reply(line, self.factory.remote_port, self.factory.local_port),
            abort=False,
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        # Closed before a complete line arrived: no answer.
        self.factory.protocol_instance = None
        self.factory.finish(None)


class _IdentFactory(ClientFactory):
    """Owns one query: its result Deferred, deadline and connection."""

    protocol = _IdentProtocol
    noisy = False

    def __init__(self, reactor: Any, remote_port: int, local_port: int, timeout: float) -> None:
        self.remote_port = remote_port
        self.local_port = local_port
        self.protocol_instance: _IdentProtocol | None = None
        self.connector: IConnector | None = None
        self.done = False
        self.result: defer.Deferred[str | None] = defer.Deferred(self._cancel)
        self._guard = reactor.callLater(timeout, self.finish, None)

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        if self.done:
            return None
        return super().buildProtocol(addr)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.finish(None)

    def _close(self, abort: bool) -> None:
        """Drop the connection (or the attempt); ``abort`` skips the FIN."""
        if self._guard.active():
            self._guard.cancel()
        proto = self.protocol_instance
        if proto is not None and proto.transport is not None:
            if abort:
                proto.transport.abortConnection()
            else:
                proto.transport.loseConnection()
        elif self.connector is not None and self.connector.state == "connecting":
            self.connector.stopConnecting()

    def finish(self, userid: str | None, abort: bool = True) -> None:
        """Deliver the one result and release the socket; later calls no-op."""
        if self.done:
            return
        self.done = True
        self._close(abort)
        self.result.callback(userid)

    def _cancel(self, _: defer.Deferred[str | None]) -> None:
        # The caller lost interest (e.g. the SMTP client went away).
        if not self.done:
            self.done = True
            self._close(abort=True)


def ident_lookup(
    reactor: Any,
    remote_ip: str,
    remote_port: int,
    local_ip: str,
    local_port: int,
    port: int = 113,
    timeout: float = 3.0,
) -> defer.Deferred[str | None]:
    """Ask the peer's ident service who owns its end of our connection.

    ``remote_port``/``local_port`` are the ports of the SMTP connection as
    seen by us.  Fires with the sanitised user id, or None for any kind of
    failure, within ``timeout`` seconds; never errbacks; always closes its
    socket.  ``local_ip`` is accepted for logging symmetry but not used: the
    connection is made from the default source address.
    """
    del local_ip  # see docstring
    factory = _IdentFactory(reactor, remote_port, local_port, timeout)
    try:
        factory.connector = reactor.connectTCP(remote_ip, port, factory, timeout=timeout)
    except Exception:
        factory.finish(None)
    return factory.result
