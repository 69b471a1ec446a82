"""The Twisted adapter: bytes from the transport into the session core, replies back out.

This class adds only what needs a reactor: the transport, timers, flow control. It owns
its parts rather than inheriting them: the session core
(:class:`qpconn.core.session.ServerSession`: grammar and state), the command handlers
(:class:`qpconn.smtp.commands.SMTPCommands`: hooks and replies, one object per
connection, given the session explicitly), the guard (:mod:`qpconn.server.guard`:
connection and error limits, the DATA timeout, the deadlines of :mod:`qpconn.server.deadlines`)
and the TLS layer (:mod:`qpconn.server.tls`).

While a hook answers asynchronously the transport is paused and buffered pipelined
commands wait, so replies leave in order; they go out through :mod:`qpconn.server.output`
(one write per pass, held to the end of the reactor turn).

Backpressure: the protocol is its transport's streaming producer. When the client does not
take its replies and the transport's write buffer passes its high-water mark, Twisted
calls :meth:`~SMTPServerProtocol.pauseProducing`: reading stops, and input already
buffered is not turned into commands, so a client pipelining a burst it never reads the
answers to costs one read of input and a write buffer of replies, not the work and memory
of the whole burst. A long pass stops after :data:`PIPELINE_STEP` commands: their replies
go out, so that the transport sees them in time to push back, and the rest of the burst is
parsed in the next reactor turn, so that the other sessions are served in between (one
client's burst of thousands of commands used to hold them all). A client that has not
taken its replies within ``timeout`` is aborted: a ``421`` or a polite close would only
queue behind what it does not read.

Behind a load balancer (``factory.proxy.enabled``) a connection first has to present a
PROXY header (:mod:`qpconn.server.proxy`): until it is complete nothing else happens -- no
lookup, no hook, no banner -- and the header's addresses replace the socket's before the
session starts. An untrusted peer, a malformed header or a header that does not arrive
within ``proxy_timeout`` closes the connection with one log line and nothing processed.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from qpconn.core.events import ChunkStart, MessageData, ProtocolError
from qpconn.core.reply import Reply
from qpconn.core.session import NEED_DATA, PAUSED, ServerSession
from qpconn.log.level import LevelLogger
from qpconn.server.fastpath import eager
from qpconn.server.guard import SessionGuard
from qpconn.server.idle import OwnTimers
from qpconn.server.output import ReplyWriter
from qpconn.server.proxy import ProxyHeaderWait
from qpconn.server.tls import TLSLayer
from qpconn.smtp.commands import HandlerResult, SMTPCommands

if TYPE_CHECKING:
    from qpconn.mail.connection import Connection
    from qpconn.mail.transaction import Transaction
    from qpconn.server.factory import SMTPFactory

__all__ = ["SMTPServerProtocol"]

_INTERNAL_ERROR = Reply(451, "4.3.0 Internal error - try again later")

#: Commands of one pass over buffered input after which its replies so far are written.
PIPELINE_STEP = 64


@implementer(IHalfCloseableProtocol, IHandshakeListener, IPushProducer)
class SMTPServerProtocol(Protocol):
    """One SMTP session over a Twisted transport.

    What the session *says* is decided by its handler object, :attr:`commands`: to change
    the greeting, a command or add one, subclass :class:`~qpconn.smtp.commands.SMTPCommands`
    and give it to the factory (``SMTPFactory(commands=...)``, see ``docs/protocol.md``).
    Subclass this class only to change how bytes, timers and the transport are handled.
    """

    log = LevelLogger(namespace="qpconn.protocol")
    factory: SMTPFactory
    #: the handler class for this session; None: the factory's (``SMTPFactory(commands=)``)
    commands_class: type[SMTPCommands] | None = None
    #: the connection is gone (nothing more is written or read)
    lost = False
    #: octets read from the client (the deadlines measure the data rate with it)
    bytes_received = 0
    # The session's flags start as these class defaults and enter the instance only once
    # they change: every connection used to store all nine, most keep them as they are.
    _busy = False
    _driving = False
    #: reading paused while a handler waits (or past the early-talk bound)
    _paused = False
    #: the transport's write buffer is full: the client is not taking its replies
    _output_paused = False
    _read_closed = False
    #: the handler that went asynchronous, if any: cleanup waits for it
    _inflight: defer.Deferred[None] | None = None
    #: the idle timeout set aside while our own hooks run (they are not client idleness)
    _idle_saved: float | None = None
    #: the SMTP session began (lookups, hooks, greeting); False while a PROXY header
    #: is awaited and for connections refused before that: those run no hooks at all
    _started = False
    #: the wait for a PROXY header, while there is one (qpconn.server.proxy)
    _proxy_wait: ProxyHeaderWait | None = None
    #: the rest of a long pipelined burst, parsed in the next reactor turn (see _drive)
    _later: Any = None
    #: the idle timeout in seconds (None: none), as Twisted's TimeoutMixin named it
    timeOut: float | None = None
    #: the running idle timer: an entry of the factory's IdleTimers, or a DelayedCall of
    #: this session's own ``callLater``; None when it does not run
    _idle: Any = None
    #: None: the idle timer is one entry in the factory's timers (qpconn.server.idle), on
    #: the factory's clock. Set on an instance (``proto.callLater = clock.callLater``, as
    #: the testing kit does), the session gets a DelayedCall of its own from it instead.
    callLater: Callable[..., Any] | None = None
    _own_timers: OwnTimers | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse handler methods on a protocol subclass: they would never be called.

        Before 0.2 the handlers were base classes of the protocol; code that overrides
        ``smtp_RCPT`` or ``greeting`` here must move them to an SMTPCommands subclass.
        """
        super().__init_subclass__(**kwargs)
        misplaced = sorted(
            name
            for name in vars(cls)
            if not name.startswith("__")
            and (name.startswith("smtp_") or hasattr(SMTPCommands, name))
            and not hasattr(Protocol, name)
        )
        if misplaced:
            raise TypeError(
                f"{cls.__qualname__} defines {', '.join(misplaced)}: command handlers belong "
                "to a subclass of qpconn.smtp.commands.SMTPCommands, given to the factory as "
                "SMTPFactory(commands=...) or make_service(..., commands=...) "
                "(docs/protocol.md)"
            )

    def connectionMade(self) -> None:
        factory = self.factory
        # Bound once: a Logger class attribute builds a new bound Logger on every access.
        # The bound Logger holds this protocol (its log_source): _release breaks that
        # cycle when the session ends, so the session's objects go when their last
        # reference does, not at the garbage collector's next pass.
        self.log = self.log
        self.session = ServerSession(factory.limits)  # shared, read-only (own_limits)
        handlers = self.commands_class or factory.commands
        #: the command handlers of this session (they own its Connection and Transaction)
        self.commands = handlers(
            factory, self.session, factory.build_connection(self.transport), self.log
        )
        self.guard = SessionGuard(self)
        # XCLIENT's real client counts against the per-address limits in the proxy's place
        self.commands.client_changed = self.guard.readmit
        self.tls = TLSLayer(self)
        #: replies out, and the close (registers this protocol as the transport's producer)
        self.output = ReplyWriter(self)
        factory.session_started(self)
        proxy = factory.proxy
        if not proxy.enabled:
            self.begin_session()
        elif not proxy.trusts(self.commands.connection.remote_ip):
            self.refuse("PROXY header required, peer is not a trusted proxy")
        else:
            self._proxy_wait = ProxyHeaderWait(self)

    @property
    def connection(self) -> Connection:
        """The session's Connection (the handlers own it; STARTTLS replaces it)."""
        return self.commands.connection

    @property
    def transaction(self) -> Transaction:
        """The session's current Transaction (owned by the handlers)."""
        return self.commands.transaction

    def log_context(self) -> dict[str, Any]:
        """Fields every log event of this session carries."""
        return self.commands.log_context()

    @property
    def handler_running(self) -> bool:
        """A handler went asynchronous and is still at work (the queue hook, typically)."""
        return self._inflight is not None

    def pause_reading(self) -> None:
        """Stop reading from the client until the handler at work is done (flow control)."""
        self._pause()

    @property
    def held(self) -> bool:
        """True while input waits on the server, not on the client: a handler is at work
        or the client does not take its replies (the deadlines do not run then)."""
        return self._busy or self._output_paused

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS layer finished its handshake."""
        self.tls.handshake_completed()

    def begin_session(self) -> None:
        """Start the SMTP session proper: lookups, pre-connection/connect hooks, greeting."""
        self._end_proxy_wait()
        if self.tls.handshake_pending():
            return  # implicit TLS: called again once the handshake is done (tls.py)
        if not self.guard.admit():
            return  # over a connection limit: 421 sent, nothing else runs (guard.py)
        self._started = True
        conn = self.commands.connection
        self.log.info(
            "{conn_id} connect from {remote_ip}:{remote_port} to {local_ip}:{local_port}",
            remote_port=conn.remote_port,
            local_ip=conn.local_ip,
            local_port=conn.local_port,
            **self.log_context(),
        )
        self.setTimeout(self.factory.timeout)
        self._run(self._open(), self._greet)

    async def _open(self) -> tuple[Reply, bool]:
        await self.factory.lookup_peer(self.commands.connection)
        return await self.commands.start_session()

    def refuse(self, reason: str) -> None:
        """Close before the SMTP session began: no banner, no hooks, one log line."""
        if self._started or self.lost:
            return
        self._end_proxy_wait()
        self.session.close()
        conn = self.commands.connection
        self.log.warn(
            "{conn_id} refused {remote_ip}:{remote_port}: {reason}",
            remote_port=conn.remote_port,
            reason=reason,
            **self.log_context(),
        )
        self.output.hang_up()

    def _end_proxy_wait(self) -> None:
        if self._proxy_wait is not None:
            self._proxy_wait.cancel()
            self._proxy_wait = None

    # -- input ----------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if not self._started:
            if self._proxy_wait is not None:
                self._proxy_wait.feed(data)  # the session begins once the header is in
            return  # refused: whatever else arrives is dropped unread
        self.resetTimeout()
        self.bytes_received += len(data)
        if self.guard.deadlines.input_arrived():
            return  # too late or too slow: 421 on its way, this input is not read
        self.session.receive_data(data)
        if self.guard.reading_before_greeting():
            self.guard.note_early_talk()  # evidence for earlytalker
        self._drive()
        if data[-1:] != b"\n":  # a read that ends a line leaves no command line unfinished
            self.guard.deadlines.input_left()  # one begun: its deadline runs

    def _drive(self) -> None:
        """Turn buffered input into events until a hook goes asynchronous, input runs out or
        the client stops taking its replies (backpressure: the rest waits, unparsed).

        An event that needs a reply (a command, a message's end, a chunk's end, a SASL
        response) is answered here, in one step, when its handler never waits, which is
        what most do: its coroutine is stepped once and the reply handed to the core,
        with no callback in between. Only a handler that waits goes through
        :meth:`_wait`.
        """
        if self._driving or self.lost:
            return
        self._driving = True
        session = self.session
        commands = self.commands
        start = eager.start
        budget = PIPELINE_STEP  # commands until their replies so far are handed over
        try:
            while not self._busy and not self._output_paused:
                event = session.next_event()
                if event is NEED_DATA or event is PAUSED:
                    break
                kind = type(event)
                if kind is MessageData:
                    if not commands.store_message_data(event.data):
                        self._run(commands.headers_end(), None)  # data_headers_end may wait
                    continue
                if kind is ChunkStart:
                    # BDAT (smtp/extensions.py); then the chunk is read under data_timeout
                    self._run(commands.chunk_start(event), self.guard.chunk_started)
                    continue
                if kind is ProtocolError:
                    self.protocol_error(event)  # a 500 each: bounded by max_errors
                    continue
                # A Command, MessageEnd, ChunkEnd or AuthResponse: one reply each.
                self._busy = True
                result, deferred = start(commands.dispatch(event))
                if deferred is None:
                    self._busy = False
                    self._answer(result)
                    if self._paused:
                        self._resume()
                else:
                    self._wait(deferred, self._answer)
                budget -= 1
                if not budget:
                    # A long pipelined burst: its replies so far go out (the transport can
                    # push back), and the rest waits for the next reactor turn, so that one
                    # client's burst does not hold every other session for its whole length.
                    self._continue_later()
                    break
        finally:
            self._driving = False
        self.output.flush()
        if self._read_closed and not self.held and not self.lost:
            # The client half-closed and everything it sent has been answered.
            self.output.send_unsent()
            self.output.hang_up()

    def _continue_later(self) -> None:
        """The rest of the buffered input waits for the next reactor turn; meanwhile
        nothing more is read (what the client sends stays in the kernel, as when it does
        not take its replies), so the input held stays bounded."""
        self._pause()
        if self._later is None:
            self._later = self.factory.clock.callLater(0, self._continue)

    def _continue(self) -> None:
        self._later = None
        if self._paused and not self._busy:
            self._resume()
        self._drive()

    def readConnectionLost(self) -> None:
        """The client shut its sending side: answer what it sent, then close.

        Without this, Twisted would treat the EOF as a lost connection and drop the
        replies still owed, including the 250 for a message that was already stored.
        """
        self._read_closed = True
        if not self._started:
            self.output.hang_up()
            return
        self._drive()

    def writeConnectionLost(self) -> None:
        self.output.discard()  # the client reads no more
        self.output.hang_up()

    def protocol_error(self, event: ProtocolError) -> None:
        """The core refused a line itself; count it (limits on errors build on this)."""
        self.log.debug(
            "{conn_id} protocol error: {code} {text}",
            code=event.reply.code,
            text=event.reply.text,
            **self.log_context(),
        )
        self.guard.count_error()  # at max_errors: 421 and close

    # -- running handlers -----------------------------------------------------------------
    def _run(
        self,
        coro: Coroutine[Any, Any, Any],
        apply: Callable[[Any], None] | None,
    ) -> None:
        """Run a handler; while it waits on something, hold the client's further input."""
        self._busy = True
        result, deferred = eager.start(coro)  # most handlers never wait: no Deferred
        if deferred is None:
            # Finished at once: no timeout was set aside, no Deferred to forget.
            self._busy = False
            self._apply(result, apply)
            if not self._driving:
                self._drive()  # e.g. the greeting: write it, then read what came early
            return
        self._wait(deferred, apply)

    def _wait(self, deferred: defer.Deferred[Any], apply: Callable[[Any], None] | None) -> None:
        """A handler waits on something: hold the client's input until ``deferred`` fires."""
        deferred.addBoth(self._finished, apply)
        if self._busy:
            self._inflight = deferred
            if not self.guard.reading_before_greeting():  # early talk must be seen
                self._pause()
            self._idle_saved = self.setTimeout(None)

    def _finished(self, result: Any, apply: Callable[[Any], None] | None) -> None:
        self._busy = False
        self._inflight = None
        if self._idle_saved is not None and not self.lost:
            self.setTimeout(self._idle_saved)
        self._idle_saved = None
        self.guard.deadlines.resume()  # the hook's time was ours, not the client's
        self._apply(result, apply)
        self._drive()

    def _apply(self, result: Any, apply: Callable[[Any], None] | None) -> None:
        """A handler's outcome takes effect (a failure becomes 451); reading resumes."""
        if isinstance(result, Failure):
            self.log.failure("{conn_id} handler failed", result, **self.log_context())
            result = (_INTERNAL_ERROR, False)
        if not self.lost and apply is not None:
            apply(result)
        if self._paused:
            self._resume()

    def _greet(self, result: tuple[Reply, bool]) -> None:
        reply, close = result
        self.session.greet(reply, close)

    def _answer(self, result: HandlerResult | Failure) -> None:
        """A reply-needing event's handler is done: its reply goes to the core (a failure
        or no reply at all becomes 451, logged)."""
        if type(result) is Reply:
            reply, close = result, False
        elif type(result) is tuple:
            reply, close = result
        else:
            reply, close = self._odd_result(result)
        session = self.session
        answered = session.pending
        if answered is None:
            return  # the session ended while the handler ran (timeout, disconnect verdict)
        session.send(reply, close)
        self.guard.after_reply(answered, reply)  # max_errors, data_timeout

    def _odd_result(self, result: Any) -> tuple[Reply, bool]:
        """What a handler gave that is not a plain Reply or (Reply, close): a failure (logged,
        451), a Reply subclass, or nothing (logged as an error if a reply is owed, 451)."""
        if isinstance(result, Failure):
            self.log.failure("{conn_id} handler failed", result, **self.log_context())
            return _INTERNAL_ERROR, False
        if isinstance(result, Reply):
            return result, False
        if isinstance(result, tuple):
            return result  # type: ignore[return-value]
        if self.session.pending is not None:
            self.log.error("{conn_id} a handler returned no reply", **self.log_context())
        return _INTERNAL_ERROR, False

    def _pause(self) -> None:
        if not self._paused and not self.lost:
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self) -> None:
        self._paused = False
        if not self.lost and not self._output_paused:
            self.transport.resumeProducing()

    # -- IPushProducer: the transport's write buffer fills and drains ------------------------
    def pauseProducing(self) -> None:
        """The client is not taking its replies: read nothing more, parse nothing more."""
        if self._output_paused or self.lost:
            return
        self._output_paused = True
        if not self._paused:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The client took its replies: read again, and go on with what is buffered."""
        if not self._output_paused or self.lost:
            return
        self._output_paused = False
        self.guard.deadlines.resume()  # the wait was for the client's reading, not its input
        if not self._paused:
            self.transport.resumeProducing()
        self._drive()

    def stopProducing(self) -> None:
        """The connection is going: connectionLost follows and cleans up."""

    # -- output (qpconn.server.output) -----------------------------------------------------
    def flush(self) -> None:
        """Write what the core has to send (now, or with this turn's other replies)."""
        self.output.flush()

    def close_with(self, reply: Reply) -> None:
        """End the session with a reply no command asked for (421): written, then closed."""
        self.output.close_with(reply)

    def timeoutConnection(self) -> None:
        """Idle too long: say so (RFC 5321 §4.5.3.2 wants a 421) and close; a client that
        does not take its replies is aborted instead (the 421 would wait behind them)."""
        if self._output_paused or self.session.closed:
            reason = f"replies not read for {self.factory.timeout:g}s"
            self.log.info(
                "{conn_id} deadline: {reason}",
                reason=reason,
                event="deadline",
                limit="timeout",
                **self.log_context(),
            )
            if self.output.closed_with is None:
                self.output.closed_with = f"an abort ({reason})"
            self.session.close()
            self.transport.abortConnection()
            return
        self.log.info("{conn_id} idle timeout", **self.log_context())
        self.close_with(Reply(421, f"4.4.2 {self.factory.me} Error: timeout exceeded"))
        if not self.lost:
            self.setTimeout(self.factory.timeout)  # this timer has run: the next one aborts

    # -- the idle timer (TimeoutMixin's interface, one shared heap: qpconn.server.idle) ----
    def setTimeout(self, period: float | None) -> float | None:
        """The idle timeout becomes ``period`` seconds from now (None: no idle timeout);
        returns the previous one. As Twisted's TimeoutMixin.setTimeout."""
        previous, self.timeOut = self.timeOut, period
        idle = self._idle
        if idle is not None:
            timers = self.factory.idle_timers if type(idle) is list else self._own_timers
            assert timers is not None
            if period is None:
                self._idle = None
                timers.cancel(idle)
            else:
                self._idle = timers.reset(idle, period)
        elif period is not None:
            later = self.callLater
            if later is None:
                self._idle = self.factory.idle_timers.arm(self, period)
            else:
                own = self._own_timers
                if own is None or own.call_later != later:
                    own = self._own_timers = OwnTimers(later)
                self._idle = own.arm(self, period)
        return previous

    def resetTimeout(self) -> None:
        """The client did something: the idle timer, if it runs, starts over."""
        idle = self._idle
        if idle is not None and self.timeOut is not None:
            if type(idle) is list:
                self._idle = self.factory.idle_timers.reset(idle, self.timeOut)
            else:
                idle.reset(self.timeOut)

    def idle_expired(self) -> None:
        """The idle timer ran out (called by the timers): it is spent, then
        :meth:`timeoutConnection` decides."""
        self._idle = None
        self.timeoutConnection()

    # -- end ------------------------------------------------------------------------------
    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self.output.discard()
        self.setTimeout(None)
        if self._later is not None:
            self._later.cancel()
            self._later = None
        self.guard.deadlines.stop()
        self.tls.cancel_timer()
        self.tls.connection_lost(reason)  # a handshake under way failed: say why (tls.py)
        self.guard.release_slot()  # max_connections* count live connections
        self.session.close()
        if not self._started:
            # Refused or gone before a PROXY header completed: nothing ran, nothing to undo.
            self._end_proxy_wait()
            self.commands.transaction.close()
            self.factory.session_ended(self)
            self.commands.connection.reset()
            self._release()
            return
        if self._inflight is not None:
            # A handler is still at work (e.g. queueing the message): the transaction is
            # its until it is done, so the disconnect hooks and cleanup wait for it.
            self._inflight.addBoth(lambda _: self._start_close())
        else:
            self._start_close()

    def _start_close(self) -> None:
        result, deferred = eager.start(self._close())  # no Deferred unless a hook waits
        if deferred is not None:
            deferred.addErrback(self._close_failed)
        elif isinstance(result, Failure):
            self._close_failed(result)

    def _close_failed(self, failure: Failure) -> None:
        self.log.failure("{conn_id} cleanup failed", failure, **self.log_context())

    async def _close(self) -> None:
        try:
            await self.commands.close()  # disconnect hooks; the transaction is released
        finally:
            self.factory.session_ended(self)
            closed_with = self.output.closed_with
            if closed_with is None:
                self.log.info("{conn_id} disconnect", **self.log_context())
            else:
                self.log.info(
                    "{conn_id} disconnect: closed by the server after {reply}",
                    reply=closed_with,
                    closed_by="server",
                    **self.log_context(),
                )
            self.commands.connection.reset()
            self._release()

    def _release(self) -> None:
        """Break the session's reference cycles, so that it is freed by reference counting.

        The bound Logger refers back to this protocol (its log_source; a later event binds
        a new one), and so do the guard and the TLS layer it owns.
        """
        self.__dict__.pop("log", None)
        self.commands.log = type(self).log  # the handlers held the same bound Logger
        del self.guard.protocol, self.guard.deadlines.protocol, self.tls.protocol
        del self.output.protocol
