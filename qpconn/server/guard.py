"""The adapter's defences that need a reactor: connection limits, error limit, DATA timeout,
and noticing a client that talks before the greeting.

A mixin of :class:`~qpconn.server.protocol.SMTPServerProtocol`, kept apart so that the
adapter stays about moving bytes. The limits themselves are read by
:class:`qpconn.smtp.limits.SessionLimits`; the rules applied here:

* **Connections.** Once the client's address is final (after a PROXY header, if any) and
  before any lookup or hook, a session over ``max_connections`` or
  ``max_connections_per_ip`` gets ``421 4.7.0`` and is closed. Refused connections are
  never counted; an admitted one is released when its connection is lost.
* **Errors.** Every protocol error the core answers and every 5xx reply counts; at
  ``max_errors`` the client gets ``421 4.7.0`` after the reply that reached it and is
  disconnected. A message accepted for delivery resets the count: a client that delivers
  mail is not an attacker, even if some of its recipients were unknown.
* **DATA timeout.** After ``354``, and while the octets of a BDAT chunk are read, the
  idle timer runs with ``data_timeout`` instead of ``timeout``, and returns to ``timeout``
  with the reply to the message (or to the chunk).
* **Early talk.** The transport keeps being read while the greeting is prepared (lookups
  and ``connect`` hooks), unlike while any other hook runs: bytes that arrive then set
  ``connection.notes["early_talker"]`` (the ``earlytalker`` plugin's evidence). They stay
  buffered in the core and are read as commands once the greeting is out, if the session
  goes on; past a few KiB reading pauses, so an early flood costs no memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qpconn.core.events import ChunkEnd, Command, MessageEnd
from qpconn.core.reply import Reply
from qpconn.core.session import State

if TYPE_CHECKING:
    from twisted.logger import Logger

    from qpconn.core.events import Command
    from qpconn.core.session import ServerSession
    from qpconn.mail.connection import Connection
    from qpconn.server.factory import SMTPFactory

# Plain names: an Enum member looked up on its class costs ten times a global.
_GREETING = State.GREETING
_DATA = State.DATA
_CLOSED = State.CLOSED

__all__ = ["SessionGuard", "EARLY_TALK_BUFFER"]

#: Bytes read before the greeting beyond which the transport is paused until it is sent.
EARLY_TALK_BUFFER = 4096


class SessionGuard:
    """Limits for :class:`SMTPServerProtocol`; see the module docstring."""

    factory: SMTPFactory
    session: ServerSession
    connection: Connection
    transport: Any
    log: Logger
    me: str
    errors: int
    timeOut: float | None
    _lost: bool
    _admitted: bool = False
    _admitted_ip: str | None = None

    if TYPE_CHECKING:

        def setTimeout(self, period: float | None) -> float | None: ...
        def _pause(self) -> None: ...
        def _flush(self) -> None: ...
        def log_context(self) -> dict[str, Any]: ...

    # -- connection limits ----------------------------------------------------------------
    def admit(self) -> bool:
        """Count this session against the connection limits, or refuse it with 421."""
        factory = self.factory
        ip = self.connection.remote_ip
        reason = factory.connection_counter.admit(ip, factory.session_limits)
        if reason is None:
            self._admitted, self._admitted_ip = True, ip
            if self.session.buffered:
                # Bytes that came with the PROXY header: the client did not wait either.
                self.connection.notes["early_talker"] = True
            return True
        self.log.warn(
            "{conn_id} refused {remote_ip}:{remote_port}: {reason}",
            remote_port=self.connection.remote_port,
            reason=reason,
            **self.log_context(),
        )
        text = "Too many connections from your address" if "address" in reason else (
            "Too many connections"
        )
        self.session.close()
        self.transport.write(Reply(421, f"4.7.0 {self.me} {text}, try again later").to_bytes())
        self.transport.loseConnection()
        return False

    def release_slot(self) -> None:
        """The connection is gone: it no longer counts (idempotent)."""
        if self._admitted:
            self._admitted = False
            self.factory.connection_counter.release(self._admitted_ip)

    # -- early talk -----------------------------------------------------------------------
    def reading_before_greeting(self) -> bool:
        """True while the greeting is being prepared: keep reading to notice early talk."""
        return self.session.state is _GREETING

    def note_early_talk(self) -> None:
        """Bytes arrived before the greeting: note it; stop reading past a bound."""
        self.connection.notes["early_talker"] = True
        if self.session.buffered > EARLY_TALK_BUFFER:
            self._pause()  # resumed when the greeting's hooks are done

    # -- errors and the DATA timeout --------------------------------------------------------
    def count_error(self) -> None:
        """One more protocol error or 5xx reply; at ``max_errors``, 421 and close."""
        self.errors += 1
        limit = self.factory.session_limits.max_errors
        if limit and self.errors >= limit and not self.session.closed:
            self.log.info(
                "{conn_id} too many errors ({errors})", errors=self.errors, **self.log_context()
            )
            self.session.send_unsolicited(Reply(421, f"4.7.0 {self.me} Too many errors"))

    def after_reply(self, answered: Command | MessageEnd | ChunkEnd | None, reply: Reply) -> None:
        """Book-keeping once a reply went out: the error count and the phase's timeout."""
        if self.session.state is _CLOSED:
            return
        code = reply.code
        if 500 <= code < 600:
            self.count_error()
            if self.session.closed:
                return
        elif 200 <= code < 300 and type(answered) is not Command:
            delivered = isinstance(answered, MessageEnd) or (
                isinstance(answered, ChunkEnd) and answered.last  # BDAT ... LAST
            )
            if delivered:
                self.errors = 0
        self.phase_timeout()

    def _chunk_started(self, _result: object) -> None:
        """A BDAT chunk's octets follow: they are message text (``data_timeout``)."""
        self.phase_timeout()

    def phase_timeout(self) -> None:
        """``data_timeout`` while message text is read, ``timeout`` otherwise."""
        if self._lost:
            return
        idle = self.factory.timeout
        if self.session.state is _DATA or self.session.reading_chunk:
            want = self.factory.session_limits.data_timeout_or(idle)
        else:
            want = idle
        if self.timeOut != want:
            self.setTimeout(want)
