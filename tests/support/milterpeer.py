"""A milter of our own for the tests: the milter side of the protocol, scripted, on loopback.

It speaks the protocol with qpconn's codec from the other end (``decode_command``, the
reply messages' ``encode``), records every command of every connection, and answers as
the test says:

* ``replies``: command class name (``"Rcpt"``, ``"EndOfMessage"`` ...) to the list of
  reply messages to send for it, or to a function of the command giving that list; by
  default ``Continue`` (``Accept`` at the end of the message). A number in the list is a
  pause of that many seconds before the rest is sent;
* ``actions``, ``protocol``, ``macros``: what it asks for at option negotiation;
* ``mode`` breaks the protocol on purpose: ``"garbage"`` answers the first command after
  negotiation with bytes that are no packet; ``"hang"`` never answers ``hang_on`` (a
  command class name); ``"close"`` closes the connection when ``hang_on`` arrives;
  ``"bad_negotiation"`` answers option negotiation with version 9; ``"unsolicited"``
  answers connect twice, so the second reply comes when none is due.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.protocol import Factory, Protocol

from qpconn.milter import codec
from qpconn.milter.codec import Actions, Steps

_NO_REPLY = (codec.DefineMacros, codec.Abort, codec.Quit, codec.QuitNewConnection)
_WAIVED = {
    codec.Connect: Steps.NR_CONNECT, codec.Helo: Steps.NR_HELO, codec.Mail: Steps.NR_MAIL,
    codec.Rcpt: Steps.NR_RCPT, codec.Data: Steps.NR_DATA, codec.HeaderField: Steps.NR_HEADER,
    codec.EndOfHeaders: Steps.NR_EOH, codec.BodyChunk: Steps.NR_BODY,
}  # fmt: skip

Replies = list[Any] | Callable[[codec.Message], list[Any]]


class _PeerConnection(Protocol):
    def __init__(self, owner: MilterPeer) -> None:
        self.owner = owner
        self.reader = codec.PacketReader()
        self.commands: list[codec.Message] = []
        self.negotiated = False

    def connectionMade(self) -> None:
        self.owner.connections.append(self.commands)

    def dataReceived(self, data: bytes) -> None:
        self.reader.feed(data)
        for code, payload in self.reader.packets():
            command = codec.decode_command(code, payload)
            self.commands.append(command)
            self.answer(command)
            if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]
                return

    def answer(self, command: codec.Message) -> None:
        owner = self.owner
        name = type(command).__name__
        if isinstance(command, codec.OptionNegotiation):
            version = 9 if owner.mode == "bad_negotiation" else 6
            reply = codec.OptionNegotiation(version, owner.actions, owner.protocol, owner.macros)
            self.transport.write(reply.encode())
            self.negotiated = True
            return
        if owner.mode in ("hang", "close") and name == owner.hang_on:
            if owner.mode == "close":
                self.transport.loseConnection()
            return
        if owner.mode == "garbage" and not isinstance(command, _NO_REPLY):
            self.transport.write(b"\xff\xff\xff\xffnot a milter reply")
            return
        if isinstance(command, _NO_REPLY):
            return
        if owner.protocol & _WAIVED.get(type(command), 0):
            return
        if owner.mode == "unsolicited" and isinstance(command, codec.Connect):
            self.transport.write(codec.Continue().encode())
        scripted = owner.replies.get(name)
        if scripted is None:
            default = (
                codec.Accept() if isinstance(command, codec.EndOfMessage) else codec.Continue()
            )
            replies: list[Any] = [default]
        elif callable(scripted):
            replies = scripted(command)
        else:
            replies = list(scripted)
        self.send(list(replies))

    def send(self, replies: list[Any]) -> None:
        while replies:
            reply = replies.pop(0)
            if isinstance(reply, (int, float)):
                reactor.callLater(reply, self.send, replies)
                return
            if self.transport is None or not self.transport.connected:
                return
            self.transport.write(reply.encode())

    def connectionLost(self, reason: Any = None) -> None:
        self.owner.closed += 1


class MilterPeer:
    """A scripted milter listening on 127.0.0.1; ``address`` is its ``inet:`` address."""

    def __init__(
        self,
        replies: dict[str, Replies] | None = None,
        *,
        actions: int = Actions.ALL,
        protocol: int = 0,
        macros: tuple[tuple[int, str], ...] = (),
        mode: str | None = None,
        hang_on: str = "",
    ) -> None:
        self.replies: dict[str, Replies] = dict(replies or {})
        self.actions = actions
        self.protocol = protocol
        self.macros = macros
        self.mode = mode
        self.hang_on = hang_on
        self.connections: list[list[codec.Message]] = []
        self.closed = 0
        self.port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _PeerConnection(self)), interface="127.0.0.1"
        )

    @property
    def address(self) -> str:
        return f"inet:127.0.0.1:{self.port.getHost().port}"

    def commands(self, index: int = -1) -> list[codec.Message]:
        """The commands of connection ``index`` (default: the last), macros included."""
        return self.connections[index]

    def steps(self, index: int = -1) -> list[str]:
        """The names of the commands of connection ``index``, without the macros."""
        return [type(c).__name__ for c in self.commands(index)
                if not isinstance(c, codec.DefineMacros)]  # fmt: skip

    def macros_for(self, stage: bytes, index: int = -1) -> dict[str, str]:
        """Every macro sent for the command letter ``stage`` on connection ``index``."""
        found: dict[str, str] = {}
        for command in self.commands(index):
            if isinstance(command, codec.DefineMacros) and command.stage == stage:
                found.update(command.macros)
        return found

    def wait_closed(self, timeout: float = 5.0) -> Any:
        """Fires once every connection so far has been closed by qpconn (bounded)."""
        deadline = time.monotonic() + timeout

        def check() -> Any:
            if self.closed >= len(self.connections) or time.monotonic() > deadline:
                return None
            return task.deferLater(reactor, 0.02, check)

        return task.deferLater(reactor, 0, check)

    def stop(self) -> Any:
        return self.port.stopListening()
