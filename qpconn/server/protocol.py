"""The Twisted adapter: bytes from the transport into the session core, replies back out.

This class adds only what needs a reactor: the transport, timers, flow control. The SMTP
logic is in :class:`qpconn.smtp.commands.SMTPCommands` (hooks and replies) and
:class:`qpconn.core.session.ServerSession` (grammar and state).

While a hook answers asynchronously the transport is paused and buffered pipelined
commands wait, so replies leave in order; all replies produced in one pass are written
with a single ``write()`` (a reply split over several writes meets Nagle's algorithm and
delayed ACKs and can stall a pipelining client for tens of milliseconds).

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
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from qpconn.core.events import ChunkStart, Command, MessageData, ProtocolError
from qpconn.core.proxy import ProxyHeaderParser, ProxyProtocolError
from qpconn.core.reply import Reply
from qpconn.core.session import NEED_DATA, PAUSED, ServerSession, State
from qpconn.log.level import LevelLogger
from qpconn.server.fastpath import eager, fastwrite
from qpconn.server.fastpath.turnend import at_turn_end
from qpconn.server.guard import SessionGuard
from qpconn.server.proxy import apply_proxy_info
from qpconn.server.tls import TLSAdapter
from qpconn.smtp.commands import HandlerResult, SMTPCommands

if TYPE_CHECKING:
    from qpconn.server.factory import SMTPFactory

__all__ = ["SMTPServerProtocol"]

_INTERNAL_ERROR = Reply(451, "4.3.0 Internal error - try again later")
# States whose reply must be on its way before anything else happens (close, TLS), as
# plain names: an Enum member looked up on its class costs ten times a global.
_CLOSED = State.CLOSED
_STARTTLS = State.STARTTLS


@implementer(IHalfCloseableProtocol)
class SMTPServerProtocol(SessionGuard, TLSAdapter, SMTPCommands, Protocol, TimeoutMixin):
    """One SMTP session over a Twisted transport. Subclass it to change behaviour.

    Documented extension points (see ``docs/protocol.md``): :meth:`greeting`,
    :meth:`ehlo_lines`, ``smtp_<VERB>`` handlers (override one, or add a new verb), and
    :meth:`unrecognized_command`. Plug a subclass in with ``SMTPFactory(protocol=...)``.
    """

    log = LevelLogger(namespace="qpconn.protocol")
    factory: SMTPFactory

    def connectionMade(self) -> None:
        factory = self.factory
        # Bound once: a Logger class attribute builds a new bound Logger on every access.
        # The bound Logger holds this protocol (its log_source): _release_log breaks that
        # cycle when the session ends, so the session's objects go when their last
        # reference does, not at the garbage collector's next pass.
        self.log = self.log
        self.config = factory.config
        self.runner = factory.runner
        self.me = factory.me
        self.databytes = factory.databytes
        self.size_threshold = factory.size_threshold
        self.spool_dir = factory.spool_dir
        self.session_limits = factory.session_limits
        self.security = factory.security
        self.connection = factory.build_connection(self.transport)
        self.session = ServerSession(factory.limits.copy())
        self.transaction = self.new_transaction()
        self.errors = 0
        self._busy = False
        self._driving = False
        self._paused = False
        self._lost = False
        self._read_closed = False
        #: reply bytes held until the end of this reactor turn (see _flush)
        self._unsent: list[bytes] = []
        self._may_hold = fastwrite.batchable(self.transport)
        #: the handler that went asynchronous, if any: cleanup waits for it
        self._inflight: defer.Deferred[None] | None = None
        #: the idle timeout set aside while our own hooks run (they are not client idleness)
        self._idle_saved: float | None = None
        #: the SMTP session began (lookups, hooks, greeting); False while a PROXY header
        #: is awaited and for connections refused before that: those run no hooks at all
        self._started = False
        self._proxy_parser: ProxyHeaderParser | None = None
        self._proxy_timer: IDelayedCall | None = None
        factory.session_started(self)
        proxy = factory.proxy
        if not proxy.enabled:
            self._begin()
        elif not proxy.trusts(self.connection.remote_ip):
            self._refuse("PROXY header required, peer is not a trusted proxy")
        else:
            self._proxy_parser = ProxyHeaderParser(proxy.max_v2_length)
            self._proxy_timer = factory.clock.callLater(
                proxy.timeout or 5.0, self._refuse, "no complete PROXY header in time"
            )

    def _begin(self) -> None:
        """Start the SMTP session proper: lookups, pre-connection/connect hooks, greeting."""
        if self.tls_handshake_pending():
            return  # implicit TLS: called again once the handshake is done (tls.py)
        if not self.admit():
            return  # over a connection limit: 421 sent, nothing else runs (guard.py)
        self._started = True
        conn = self.connection
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
        await self.factory.lookup_peer(self.connection)
        return await self.start_session()

    # -- PROXY protocol -------------------------------------------------------------------
    def _proxy_data(self, parser: ProxyHeaderParser, data: bytes) -> None:
        """Feed the PROXY header parser; on success the session starts with what follows."""
        try:
            found = parser.feed(data)
        except ProxyProtocolError as exc:
            self._refuse(f"bad PROXY header: {exc}")
            return
        if found is None:
            return
        info, rest = found
        self._proxy_parser = None
        if self._proxy_timer is not None and self._proxy_timer.active():
            self._proxy_timer.cancel()
        self._proxy_timer = None
        balancer = f"{self.connection.remote_ip}:{self.connection.remote_port}"
        apply_proxy_info(self.connection, info)
        self.log.debug(
            "{conn_id} PROXY v{version} {command} from balancer {balancer}",
            version=info.version,
            command=info.command,
            balancer=balancer,
            **self.log_context(),
        )
        # Early talk that came with the header waits in the core until the greeting is
        # out; it must be buffered before _begin, which may greet synchronously.
        self.session.receive_data(rest)
        self._begin()

    def _refuse(self, reason: str) -> None:
        """Close before the SMTP session began: no banner, no hooks, one log line."""
        if self._started or self._lost:
            return
        self._proxy_parser = None
        if self._proxy_timer is not None and self._proxy_timer.active():
            self._proxy_timer.cancel()
        self._proxy_timer = None
        self.session.close()
        conn = self.connection
        self.log.warn(
            "{conn_id} refused {remote_ip}:{remote_port}: {reason}",
            remote_port=conn.remote_port,
            reason=reason,
            **self.log_context(),
        )
        self.transport.loseConnection()

    # -- input ----------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if not self._started:
            if self._proxy_parser is not None:
                self._proxy_data(self._proxy_parser, data)
            return  # refused: whatever else arrives is dropped unread
        self.resetTimeout()
        self.session.receive_data(data)
        if self.reading_before_greeting():
            self.note_early_talk()  # guard.py: evidence for earlytalker
        self._drive()

    def _drive(self) -> None:
        """Turn buffered input into events until a hook goes asynchronous or input runs out."""
        if self._driving or self._lost:
            return
        self._driving = True
        session = self.session
        try:
            while not self._busy:
                event = session.next_event()
                if event is NEED_DATA or event is PAUSED:
                    break
                kind = type(event)
                if kind is Command:
                    self._run(self.dispatch(event), self._answer)
                elif kind is MessageData:
                    if not self.store_message_data(event.data):
                        self._run(self._headers_end(), None)  # data_headers_end may wait
                elif isinstance(event, ChunkStart):
                    # BDAT: smtp_extensions; then the chunk is read under data_timeout
                    self._run(self.chunk_start(event), self._chunk_started)
                elif isinstance(event, ProtocolError):
                    self.protocol_error(event)
                else:
                    self._run(self.dispatch(event), self._answer)
        finally:
            self._driving = False
        self._flush()
        if self._read_closed and not self._busy and not self._lost:
            # The client half-closed and everything it sent has been answered.
            self.send_unsent()
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        """The client shut its sending side: answer what it sent, then close.

        Without this, Twisted would treat the EOF as a lost connection and drop the
        replies still owed, including the 250 for a message that was already stored.
        """
        self._read_closed = True
        if not self._started:
            self.transport.loseConnection()
            return
        self._drive()

    def writeConnectionLost(self) -> None:
        self._unsent.clear()  # the client reads no more
        self.transport.loseConnection()

    def protocol_error(self, event: ProtocolError) -> None:
        """The core refused a line itself; count it (limits on errors build on this)."""
        self.log.debug(
            "{conn_id} protocol error: {code} {text}",
            code=event.reply.code,
            text=event.reply.text,
            **self.log_context(),
        )
        self.count_error()  # at max_errors: 421 and close (guard.py)

    # -- running handlers -----------------------------------------------------------------
    def _run(
        self,
        coro: Coroutine[Any, Any, Any],
        apply: Callable[[Any], None] | None,
    ) -> None:
        """Run a handler; while it waits on something, hold the client's further input."""
        self._busy = True
        result, deferred = eager.start(coro)  # most commands never wait: no Deferred
        if deferred is None:
            # Finished at once: no timeout was set aside, no Deferred to forget.
            self._busy = False
            self._apply(result, apply)
            if not self._driving:
                self._drive()  # e.g. the greeting: write it, then read what came early
            return
        deferred.addBoth(self._finished, apply)
        if self._busy:
            self._inflight = deferred
            if not self.reading_before_greeting():  # early talk must be seen (guard.py)
                self._pause()
            self._idle_saved = self.setTimeout(None)

    def _finished(self, result: Any, apply: Callable[[Any], None] | None) -> None:
        self._busy = False
        self._inflight = None
        if self._idle_saved is not None and not self._lost:
            self.setTimeout(self._idle_saved)
        self._idle_saved = None
        self._apply(result, apply)
        self._drive()

    def _apply(self, result: Any, apply: Callable[[Any], None] | None) -> None:
        """A handler's outcome takes effect (a failure becomes 451); reading resumes."""
        if isinstance(result, Failure):
            self.log.failure("{conn_id} handler failed", result, **self.log_context())
            result = (_INTERNAL_ERROR, False)
        if not self._lost and apply is not None:
            apply(result)
        if self._paused:
            self._resume()

    def _greet(self, result: tuple[Reply, bool]) -> None:
        reply, close = result
        self.session.greet(reply, close)

    def _answer(self, result: HandlerResult) -> None:
        session = self.session
        answered = session.pending
        if answered is None:
            return  # the session ended while the handler ran (timeout, disconnect verdict)
        if result is None:
            self.log.error("{conn_id} a handler returned no reply", **self.log_context())
            result = _INTERNAL_ERROR
        reply, close = (result, False) if isinstance(result, Reply) else result
        session.send(reply, close)
        self.after_reply(answered, reply)  # max_errors, data_timeout (guard.py)

    def _pause(self) -> None:
        if not self._paused and not self._lost:
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self) -> None:
        self._paused = False
        if not self._lost:
            self.transport.resumeProducing()

    # -- output ---------------------------------------------------------------------------
    def _flush(self) -> None:
        session = self.session
        data = session.data_to_send()
        if self._lost:
            return
        state = session.state
        if data:
            if (
                self._may_hold
                and state is not _CLOSED
                and state is not _STARTTLS
                and len(self.factory.sessions) > 1
            ):
                # Sent with the other sessions' replies at the end of this turn.
                if not self._unsent:
                    at_turn_end(self.send_unsent)
                self._unsent.append(data)
                return
            self.send_unsent()  # anything held goes first: bytes stay in order
            if state is _CLOSED:
                # The last reply (221, 421): Twisted sends it and closes in one step, so
                # the session's end is handled before the client can see that reply.
                self.transport.write(data)
            else:
                fastwrite.write(self.transport, data)  # at once when nothing is queued
            if state is _STARTTLS:
                self.tls_after_flush()  # the 220 to STARTTLS is out: handshake now (tls.py)
            state = session.state  # a TLS failure may have closed it
        if state is _CLOSED:
            self.send_unsent()
            self.transport.loseConnection()

    def send_unsent(self) -> None:
        """Write the reply bytes held for the end of the turn (see _flush, fastwrite)."""
        unsent = self._unsent
        if not unsent:
            return
        data = unsent[0] if len(unsent) == 1 else b"".join(unsent)
        unsent.clear()
        if not self._lost:
            fastwrite.write(self.transport, data)

    def timeoutConnection(self) -> None:
        """Idle too long: say so (RFC 5321 §4.5.3.2 wants a 421) and close."""
        self.log.info("{conn_id} idle timeout", **self.log_context())
        self.session.send_unsolicited(Reply(421, f"4.4.2 {self.me} Error: timeout exceeded"))
        self._flush()

    # -- end ------------------------------------------------------------------------------
    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost = True
        self._unsent.clear()
        self.setTimeout(None)
        self._tls_cancel_timer()
        self.release_slot()  # max_connections* count live connections (guard.py)
        self.session.close()
        if not self._started:
            # Refused or gone before a PROXY header completed: nothing ran, nothing to undo.
            if self._proxy_timer is not None and self._proxy_timer.active():
                self._proxy_timer.cancel()
            self._proxy_parser = self._proxy_timer = None
            self.transaction.close()
            self.factory.session_ended(self)
            self.connection.reset()
            self._release_log()
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
            runner = self.runner
            for hook in ("disconnect", "post-connection"):
                if runner.has(hook):
                    await runner.run_all(hook, self.transaction)
        finally:
            try:
                self.transaction.close()
            finally:
                self.factory.session_ended(self)
                self.log.info("{conn_id} disconnect", **self.log_context())
                self.connection.reset()
                self._release_log()

    def _release_log(self) -> None:
        """Drop the bound Logger (it refers back to us); a later event binds a new one."""
        self.__dict__.pop("log", None)
