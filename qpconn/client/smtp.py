"""A small asynchronous SMTP/LMTP client for handing messages to a next hop.

Why not ``twisted.mail.smtp.ESMTPSender``: it sends one message per connection, hides
the reply to each RCPT behind a callback that cannot stop the DATA phase, and has no
notion of LMTP's one reply per recipient. A forwarding queue needs exactly those: the
reply to every command (to relay 4xx/5xx faithfully), the choice to send DATA only
after seeing the RCPT replies, and a connection that survives for the next message.

Two layers:

* :class:`ReplyProtocol` frames replies (multi-line, RFC 5321 §4.2) and hands each to the
  command waiting for it, in order. Every wait can be cancelled (a timeout): that aborts
  the connection, since a late reply would otherwise be taken as the next command's.
* :class:`SMTPClient` speaks the dialogue: greeting, EHLO/LHLO, STARTTLS, an envelope
  (pipelined when the server offers PIPELINING), the message text, RSET, QUIT.

Replies are parsed here and nowhere else: the server side has its own, stricter, rules.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from qpconn.client.stream import ChunkProducer, DotStuffer

__all__ = [
    "ClientReply",
    "NextHopError",
    "NextHopTLSError",
    "ReplyProtocol",
    "SMTPClient",
    "parse_ehlo",
]

#: RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; be lenient, but bounded.
MAX_LINE = 8192
MAX_LINES = 1000


class NextHopError(Exception):
    """The next hop could not be used: connection refused or lost, garbage, timeout.

    Always a temporary condition for our client: the message is not delivered, so the
    sender must keep it and retry.
    """


class NextHopTLSError(NextHopError):
    """STARTTLS to the next hop failed: its certificate did not verify, or the handshake.

    A separate class so that the reply can say so (``4.7.5``, RFC 3463's cryptographic
    failure) instead of blaming the connection.
    """


@dataclass(frozen=True)
class ClientReply:
    """One reply from the next hop: its code and the text of each line."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """All lines joined with a space: what goes into our own one-line replies."""
        return " ".join(line for line in self.lines if line) or ""

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


@implementer(IHandshakeListener)
class ReplyProtocol(Protocol):
    """Frames replies and matches them with waiters (FIFO); see the module docstring."""

    log = Logger(namespace="qpconn.client")

    def __init__(self) -> None:
        self._buf = b""
        self._lines: list[str] = []
        self._waiters: deque[defer.Deferred[ClientReply]] = deque()
        self.connected_once: defer.Deferred[ReplyProtocol] = defer.Deferred()
        self.lost = False
        self.broken = False
        #: why the connection ended, for logs and our 451 text
        self.reason = ""
        #: STARTTLS was answered 220 and the handshake began; it completed
        self.tls_started = False
        self.tls_done = False
        #: what certificate verification found wrong (qpconn.client.tlsverify sets it)
        self.tls_verify_failure: str | None = None

    # -- Protocol ---------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.connected_once.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    self.fail("reply line too long")
                return
            raw, self._buf = self._buf[:end], self._buf[end + 1 :]
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not self._line(line):
                return

    def _line(self, line: str) -> bool:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
            self.fail(f"malformed reply line {line[:80]!r}")
            return False
        self._lines.append(line[4:])
        if line[3:4] == "-":
            if len(self._lines) > MAX_LINES:
                self.fail("reply of too many lines")
                return False
            return True
        reply = ClientReply(int(line[:3]), tuple(self._lines))
        self._lines = []
        if not self._waiters:
            # Nothing asked: typically 421 before an idle close. The connection is done.
            self.fail(f"unsolicited reply {reply}")
            return False
        self._waiters.popleft().callback(reply)
        return True

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: TLS is up; a later loss is no TLS failure."""
        self.tls_done = True

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        error: type[NextHopError] = NextHopError
        if self.tls_started and not self.tls_done:
            # The handshake failed: say how, not that the next hop hung up on us.
            from qpconn.client.tlsverify import tls_failure_text

            error = NextHopTLSError
            self.reason = self.reason or tls_failure_text(reason, self.tls_verify_failure)
        if not self.reason:
            self.reason = "connection closed by the next hop"
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.errback(error(self.reason))
        if not self.connected_once.called:
            self.connected_once.errback(error(self.reason))

    # -- use --------------------------------------------------------------------------
    def expect(self) -> defer.Deferred[ClientReply]:
        """A Deferred for the next reply not yet claimed; cancel it to give up (aborts)."""
        if self.lost or self.broken:
            return defer.fail(NextHopError(self.reason or "connection not usable"))
        waiter: defer.Deferred[ClientReply] = defer.Deferred(self._cancelled)
        self._waiters.append(waiter)
        return waiter

    def _cancelled(self, waiter: defer.Deferred[ClientReply]) -> None:
        self.fail("timed out waiting for the next hop")

    def write(self, data: bytes) -> None:
        if not (self.lost or self.broken):
            self.transport.write(data)

    def fail(self, reason: str) -> None:
        """The dialogue is out of step or too slow: drop the connection, fail every wait."""
        if self.broken:
            return
        self.broken = True
        self.reason = self.reason or reason
        self.log.debug("next hop connection dropped: {reason}", reason=reason)
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()
        # abortConnection reports connectionLost later; the waiters must not hang until then.
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(NextHopError(self.reason))

    @property
    def usable(self) -> bool:
        return not (self.lost or self.broken)


def parse_ehlo(reply: ClientReply) -> dict[str, str]:
    """The extensions in an EHLO/LHLO reply: keyword (upper case) -> its parameters."""
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params
    return extensions


class SMTPClient:
    """One connection to a next hop, speaking SMTP or (``lmtp=True``) LMTP."""

    def __init__(self, protocol: ReplyProtocol, *, lmtp: bool = False, label: str = "") -> None:
        self.protocol = protocol
        self.lmtp = lmtp
        self.label = label
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.messages = 0

    @property
    def usable(self) -> bool:
        return self.protocol.usable

    async def command(self, line: str) -> ClientReply:
        """Send one command line and wait for its reply."""
        waiter = self.protocol.expect()
        self.protocol.write(line.encode("utf-8") + b"\r\n")
        return await _wait(waiter)

    async def greet(self, name: str) -> ClientReply:
        """Read the greeting and say EHLO (LHLO for LMTP; HELO if EHLO is refused)."""
        greeting = await _wait(self.protocol.expect())
        if not greeting.positive:
            raise RefusedError("greeting", greeting)
        return await self.hello(name)

    async def hello(self, name: str) -> ClientReply:
        reply = await self.command(f"{'LHLO' if self.lmtp else 'EHLO'} {name}")
        if reply.positive:
            self.extensions = parse_ehlo(reply)
            return reply
        if not self.lmtp and reply.permanent:
            reply = await self.command(f"HELO {name}")
            if reply.positive:
                self.extensions = {}
                return reply
        raise RefusedError("EHLO", reply)

    async def starttls(self, context: Any, name: str) -> ClientReply:
        """STARTTLS, then EHLO again (RFC 3207 §4.2: the old extensions are forgotten)."""
        reply = await self.command("STARTTLS")
        if not reply.positive:
            raise RefusedError("STARTTLS", reply)
        self.protocol.tls_started = True
        self.protocol.transport.startTLS(context)
        self.tls = True
        return await self.hello(name)

    async def envelope(
        self, sender: str, recipients: list[str], params: str = ""
    ) -> tuple[ClientReply, list[ClientReply]]:
        """MAIL and every RCPT; pipelined in one write when the server offers PIPELINING.

        Returns the MAIL reply and one reply per recipient (all recipients are asked even
        after a refused MAIL when pipelining: their replies are then meaningless 503s).
        """
        mail = f"MAIL FROM:{sender}{' ' + params if params else ''}"
        rcpts = [f"RCPT TO:{rcpt}" for rcpt in recipients]
        if "PIPELINING" in self.extensions:
            waiters = [self.protocol.expect() for _ in range(1 + len(rcpts))]
            self.protocol.write("".join(f"{line}\r\n" for line in [mail, *rcpts]).encode())
            replies = [await _wait(waiter) for waiter in waiters]
            return replies[0], replies[1:]
        mail_reply = await self.command(mail)
        if not mail_reply.positive:
            return mail_reply, []
        return mail_reply, [await self.command(line) for line in rcpts]

    async def data(
        self, chunks: Iterable[bytes], replies: int = 1
    ) -> tuple[ClientReply, list[ClientReply]]:
        """DATA, the dot-stuffed text, and the replies to it: one for SMTP, one per
        accepted recipient for LMTP (``replies``). Returns the reply to the DATA command
        itself and those; a refused DATA (no 354) comes back with no others."""
        go_ahead = await self.command("DATA")
        if go_ahead.code != 354:
            return go_ahead, []
        waiters = [self.protocol.expect() for _ in range(replies)]
        stuffer = DotStuffer()
        transport = self.protocol.transport
        try:
            await ChunkProducer(transport, chunks, stuffer.feed, stuffer.end).start()
        except ConnectionLost as exc:
            self.protocol.fail(str(exc))
        except Exception as exc:
            # Our side could not read the message: the next hop must not get a truncated
            # one, and aborting before the final dot makes it throw the text away.
            self.protocol.fail(f"could not send the message: {exc}")
            raise
        self.messages += 1
        return go_ahead, [await _wait(waiter) for waiter in waiters]

    async def reset(self) -> bool:
        """RSET: between messages on a reused connection, and the health check for it."""
        if not self.usable:
            return False
        try:
            return (await self.command("RSET")).positive
        except NextHopError:
            return False

    async def quit(self) -> None:
        """QUIT politely and close; never raises (the caller is done with the connection)."""
        if self.usable:
            try:
                await self.command("QUIT")
            except NextHopError:
                pass
        self.close()

    def close(self) -> None:
        if not self.protocol.lost and self.protocol.transport is not None:
            self.protocol.transport.loseConnection()


class RefusedError(NextHopError):
    """A reply that ends the dialogue before any message: refused greeting, EHLO, STARTTLS."""

    def __init__(self, stage: str, reply: ClientReply) -> None:
        super().__init__(f"{stage} refused: {reply}")
        self.stage = stage
        self.reply = reply


async def _wait(waiter: defer.Deferred[ClientReply]) -> ClientReply:
    return await waiter
