"""A real RFC 1413 ident server on loopback whose behaviour each test picks.

Twisted's ``twisted.protocols.ident.IdentServer`` mixes ``str`` and
``bytes`` on Python 3, and tests need misbehaviour anyway, so this is a tiny
server of our own.  Modes:

``"user"``         answer ``USERID : UNIX : <user>`` for the queried ports
``"no-user"``, ``"hidden-user"``, ``"unknown-error"``, ``"invalid-port"``
                   answer that ERROR
``"garbage"``      answer a line that is not ident at all
``"overlong"``     answer a USERID line far above the 1000-byte limit
``"mismatch"``     answer USERID, but for other ports than asked
``"raw"``          answer ``raw`` verbatim (bytes, line ending included)
``"hang"``         read the query, never answer, never close
``"close"``        close as soon as the query arrives

Use :func:`unused_port` for "refused" (nothing listening).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol

ERRORS = {
    "no-user": b"NO-USER",
    "hidden-user": b"HIDDEN-USER",
    "unknown-error": b"UNKNOWN-ERROR",
    "invalid-port": b"INVALID-PORT",
}
MODES = {"user", "garbage", "overlong", "mismatch", "raw", "hang", "close", *ERRORS}


class _IdentServerProtocol(Protocol):
    factory: IdentTestServer

    def __init__(self) -> None:
        self._buffer = b""

    def connectionMade(self) -> None:
        self.factory.open_connections += 1

    def connectionLost(self, reason: object = None) -> None:
        self.factory.open_connections -= 1

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if b"\n" not in self._buffer:
            return
        line, _, self._buffer = self._buffer.partition(b"\n")
        line = line.rstrip(b"\r")
        self.factory.requests.append(line)
        reply = self.factory.reply_for(line)
        if reply is None:
            if self.factory.mode == "close":
                self.transport.loseConnection()
            return  # "hang"
        self.transport.write(reply)
        self.transport.loseConnection()


class IdentTestServer(Factory):
    """Listen on 127.0.0.1:0; ``requests`` records every query line."""

    protocol = _IdentServerProtocol
    noisy = False

    def __init__(self, mode: str = "user", user: str = "alice", raw: bytes = b"") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown ident mode {mode!r}")
        self.mode = mode
        self.user = user
        self.raw = raw
        self.requests: list[bytes] = []
        #: Connections currently open, so tests can check the client hung up.
        self.open_connections = 0
        self._port: IListeningPort | None = None

    def reply_for(self, line: bytes) -> bytes | None:
        """The bytes to send for one query line (None: send nothing)."""
        ports = b" , ".join(p.strip() for p in line.split(b",", 1))
        mode = self.mode
        if mode in ("hang", "close"):
            return None
        if mode == "raw":
            return self.raw
        if mode in ERRORS:
            return ports + b" : ERROR : " + ERRORS[mode] + b"\r\n"
        if mode == "garbage":
            return b"this is not an ident reply\r\n"
        if mode == "overlong":
            return ports + b" : USERID : UNIX : " + b"a" * 1500 + b"\r\n"
        if mode == "mismatch":
            return b"1 , 2 : USERID : UNIX : " + self.user.encode() + b"\r\n"
        return ports + b" : USERID : UNIX : " + self.user.encode("utf-8") + b"\r\n"

    def start(self, reactor: Any = None) -> tuple[str, int]:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        assert self._port is not None, "not started"
        return ("127.0.0.1", self._port.getHost().port)

    @property
    def port(self) -> int:
        return self.address[1]

    def stop(self) -> defer.Deferred:
        """Stop listening; connections left open by "hang" are the client's job."""
        port, self._port = self._port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)


def start_ident_server(
    mode: str = "user", user: str = "alice", raw: bytes = b""
) -> IdentTestServer:
    """Start an :class:`IdentTestServer`; ``.port`` is its TCP port."""
    srv = IdentTestServer(mode, user=user, raw=raw)
    srv.start()
    return srv


def unused_port() -> int:
    """A loopback TCP port with (very probably) nothing listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
