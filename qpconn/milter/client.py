"""One milter connection on the reactor: connect, negotiate, one step at a time, timeouts.

The rules of the conversation are :class:`~qpconn.milter.session.MilterSession`'s; this
module only moves its bytes and keeps time, so that a milter that hangs, floods or closes
costs a session at most its timeouts, never the reactor:

* ``connect``: connecting and the option negotiation's answer (Postfix's
  ``milter_connect_timeout``);
* ``command``: each reply to connect, HELO, MAIL, RCPT and DATA
  (``milter_command_timeout``);
* ``content``: each reply while the message is sent, the end-of-message one included
  (``milter_content_timeout``). A ``progress`` packet restarts the running timer, which
  is what milters that scan slowly send it for.

Every failure is a :class:`MilterError` whose ``kind`` says which of ``unavailable``,
``timeout``, ``protocol`` or ``closed`` it was; after one the connection is closed and
every later step fails at once with the same error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from qpconn.milter import codec
from qpconn.milter.codec import MilterProtocolError
from qpconn.milter.session import PROGRESS, Answer, MilterSession

__all__ = ["MilterError", "MilterClient", "Timeouts", "parse_address", "open_milter"]

_INET = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:@\[\]]+)):(?P<port>\d+)\Z")
_SENDMAIL_INET = re.compile(r"(?P<port>\d+)@(?P<host>.+)\Z")


class MilterError(Exception):
    """A milter could not be used: ``kind`` is ``unavailable`` (no connection),
    ``timeout``, ``protocol`` (it broke the protocol) or ``closed`` (it hung up)."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(f"{kind}: {why}")
        self.kind = kind
        self.why = why


@dataclass(frozen=True)
class Timeouts:
    """Seconds for connecting and negotiating, each command reply, each content reply."""

    connect: float = 30.0
    command: float = 30.0
    content: float = 300.0


def parse_address(spec: str) -> tuple[str, str, int]:
    """``("inet"|"inet6", host, port)`` or ``("unix", path, 0)`` from a milter address.

    Postfix's forms (``inet:host:port``, ``inet:[::1]:port``, ``unix:/path``) and
    Sendmail's (``inet:port@host``, ``inet6:port@::1``, ``local:/path``) are accepted.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"milter address {spec!r}: expected inet:HOST:PORT or unix:/path")
    if kind in ("unix", "local"):
        return "unix", rest, 0
    if kind not in ("inet", "inet6"):
        raise ValueError(f"milter address {spec!r}: unknown kind {kind!r} (inet, inet6, unix)")
    match = _SENDMAIL_INET.match(rest)
    if match:
        host, port = match.group("host"), int(match.group("port"))
    else:
        match = _INET.match(rest)
        if match is None:
            raise ValueError(f"milter address {spec!r}: expected {kind}:HOST:PORT")
        host, port = match.group("v6") or match.group("host"), int(match.group("port"))
    if not 0 < port < 65536:
        raise ValueError(f"milter address {spec!r}: port {port} out of range")
    return ("inet6" if kind == "inet6" or ":" in host else "inet"), host, port


def _endpoint(reactor: Any, spec: str, timeout: float) -> Any:
    kind, where, port = parse_address(spec)
    if kind == "unix":
        return UNIXClientEndpoint(reactor, where, timeout=timeout)
    if kind == "inet6":
        return TCP6ClientEndpoint(reactor, where, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, where, port, timeout=timeout)


@implementer(IPushProducer)
class MilterClient(Protocol):
    """The transport of one :class:`MilterSession`; use :func:`open_milter` to get one.

    It registers itself as the transport's producer so that steps sent without waiting
    for a reply (headers, body chunks under ``SMFIP_NR_*``) wait instead while the
    milter is not reading: memory stays bounded by the socket buffers.
    """

    def __init__(self, reactor: Any, address: str, timeouts: Timeouts) -> None:
        self.reactor = reactor
        self.address = address
        self.timeouts = timeouts
        self.session = MilterSession()
        self.error: MilterError | None = None
        self._waiter: defer.Deferred[Any] | None = None
        self._timer: Any = None
        self._timeout = 0.0
        self._paused = False
        self._resumed: list[defer.Deferred[None]] = []

    # -- Twisted --------------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.session.reader.feed(data)
        try:
            for code, payload in self.session.reader.packets():
                self._handle(codec.decode_reply(code, payload))
        except MilterProtocolError as exc:
            self._fail(MilterError("protocol", str(exc)))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._fail(MilterError("closed", "the milter closed the connection"))
        for waiting in self._resumed:
            waiting.callback(None)
        self._resumed = []

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiting, self._resumed = self._resumed, []
        for deferred in waiting:
            deferred.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    # -- steps ----------------------------------------------------------------------------
    async def negotiate(self) -> None:
        """Send SMFIC_OPTNEG and check the answer, within the connect timeout."""
        await self._exchange(self.session.negotiation(), True, self.timeouts.connect)

    async def step(
        self, message: codec.Message, macros: Any = None, *, content: bool = False
    ) -> Answer | None:
        """Send one step (with its macros); the milter's Answer, or None when the step
        was skipped or its reply waived."""
        if self.error is not None:
            raise self.error
        data, wait = self.session.command(message, macros)
        timeout = self.timeouts.content if content else self.timeouts.command
        if not data:
            return None
        return await self._exchange(data, wait, timeout)  # type: ignore[no-any-return]

    def notify(self, message: codec.Message) -> None:
        """Send a step that gets no reply (abort, quit); failures are only remembered."""
        if self.error is None and self.transport is not None and not self.session.waiting:
            data, _ = self.session.command(message)
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    # -- internals ------------------------------------------------------------------------
    async def _exchange(self, data: bytes, wait: bool, timeout: float) -> Any:
        self.transport.write(data)
        self._timeout = timeout
        if not wait:
            if self._paused:
                drained: defer.Deferred[None] = defer.Deferred()
                self._resumed.append(drained)
                self._start_timer()
                self._waiter = drained
                try:
                    await drained
                finally:
                    self._waiter = None
                    self._stop_timer()
            if self.error is not None:
                raise self.error
            return None
        waiter: defer.Deferred[Any] = defer.Deferred()
        self._waiter = waiter
        self._start_timer()
        try:
            return await waiter
        except defer.CancelledError:
            # The hook's own time ran out (the runner cancels it): the reply may still be
            # on its way, so this conversation is out of step for good.
            self._fail(MilterError("timeout", "the hook's time ran out"))
            raise
        finally:
            self._stop_timer()

    def _handle(self, reply: codec.Message) -> None:
        if self.session.negotiating:
            self.session.negotiated(reply)
            self._settle(None)
            return
        answer = self.session.receive(reply)
        if answer == PROGRESS:
            self._start_timer()
        elif isinstance(answer, Answer):
            self._settle(answer)

    def _settle(self, result: Any) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(result)

    def _fail(self, error: MilterError) -> None:
        if self.error is None:
            self.error = error
        self._stop_timer()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.errback(Failure(self.error))
        if error.kind != "closed" and self.transport is not None:
            self.transport.abortConnection()

    def _start_timer(self) -> None:
        self._stop_timer()
        self._timer = self.reactor.callLater(self._timeout, self._expired)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self) -> None:
        self._timer = None
        self._fail(MilterError("timeout", f"no reply within {self._timeout:g} s"))


async def open_milter(reactor: Any, address: str, timeouts: Timeouts) -> MilterClient:
    """Connect to the milter at ``address`` and negotiate; MilterError on any failure."""
    client = MilterClient(reactor, address, timeouts)
    connecting = _endpoint(reactor, address, timeouts.connect).connect(
        Factory.forProtocol(lambda: client)
    )
    deadline = reactor.callLater(timeouts.connect, connecting.cancel)
    try:
        await connecting
    except defer.CancelledError:
        raise MilterError("unavailable", f"no connection within {timeouts.connect:g} s") from None
    except Exception as exc:
        raise MilterError("unavailable", str(exc) or type(exc).__name__) from None
    finally:
        if deadline.active():
            deadline.cancel()
    await client.negotiate()
    return client
