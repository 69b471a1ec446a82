"""The adapter's defences that need a reactor: connection limits, error limit, DATA timeout,
deadlines, and noticing a client that talks before the greeting.

A component that :class:`~qpconn.server.protocol.SMTPServerProtocol` owns (one per
session), kept apart so that the adapter stays about moving bytes. The limits themselves
are read by :class:`qpconn.smtp.limits.SessionLimits`; the rules applied here:

* **Connections.** Once the client's address is final (after a PROXY header, if any) and
  before any lookup or hook, a session over ``max_connections``,
  ``max_connections_per_ip`` or ``max_connection_rate`` gets ``421 4.7.0`` and is closed,
  with a log event (``event="connection_refused"``, ``limit=`` the setting) that the
  metrics count. Addresses in ``connection_limit_exceptions`` skip the per-address
  limits. Refused connections are never counted; an admitted one is released when its
  connection is lost.
* **Errors.** Every protocol error the core answers and every 5xx reply counts; at
  ``max_errors`` the client gets ``421 4.7.0`` after the reply that reached it and is
  disconnected. A message accepted for delivery resets the count: a client that delivers
  mail is not an attacker, even if some of its recipients were unknown.
* **DATA timeout.** After ``354``, and while the octets of a BDAT chunk are read, the
  idle timer runs with ``data_timeout`` instead of ``timeout``, and returns to ``timeout``
  with the reply to the message (or to the chunk).
* **Deadlines.** ``command_deadline``, ``min_data_rate`` after ``data_rate_grace`` and
  ``max_session_time``, which no byte resets: :mod:`qpconn.server.deadlines`, whose
  :class:`~qpconn.server.deadlines.SessionDeadlines` the guard holds (``guard.deadlines``).
* **Early talk.** The transport keeps being read while the greeting is prepared (lookups
  and ``connect`` hooks), unlike while any other hook runs: bytes that arrive then set
  ``connection.notes["early_talker"]`` (the ``earlytalker`` plugin's evidence). They stay
  buffered in the core and are read as commands once the greeting is out, if the session
  goes on; past a few KiB reading pauses, so an early flood costs no memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qpconn.core.events import ChunkEnd, Command, MessageEnd
from qpconn.core.reply import Reply
from qpconn.core.session import State
from qpconn.server.deadlines import SessionDeadlines
from qpconn.smtp.limits import TOO_FAST_FROM_ADDRESS, TOO_MANY, TOO_MANY_FROM_ADDRESS

if TYPE_CHECKING:
    from qpconn.mail.connection import Connection
    from qpconn.server.protocol import SMTPServerProtocol

__all__ = ["SessionGuard", "EARLY_TALK_BUFFER"]

#: Bytes read before the greeting beyond which the transport is paused until it is sent.
EARLY_TALK_BUFFER = 4096


#: The log's reason and the client's reply text for each connection limit.
_REFUSALS = {
    TOO_MANY: ("too many connections", "Too many connections"),
    TOO_MANY_FROM_ADDRESS: (
        "too many connections from this address",
        "Too many connections from your address",
    ),
    TOO_FAST_FROM_ADDRESS: (
        "too many connections from this address in a short time",
        "Too many connections from your address in a short time",
    ),
}


class SessionGuard:
    """The limits of one session; see the module docstring.

    It acts on the session through its protocol: the idle timer, pausing the transport,
    the 421 written before a refused session is closed.
    """

    # One per session, held for the session's whole life (idle ones included): slots keep
    # it to its fields, with no attribute dict beside them.
    __slots__ = (
        "_admitted",
        "_admitted_ip",
        "counter",
        "deadlines",
        "errors",
        "limits",
        "protocol",
        "session",
    )  # fmt: skip

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self.protocol = protocol
        factory = protocol.factory
        self.limits = factory.session_limits
        self.counter = factory.connection_counter
        self.session = protocol.session
        #: protocol errors and 5xx replies since the last delivered message
        self.errors = 0
        self._admitted_ip: str | None = None
        self._admitted = False
        #: command_deadline, min_data_rate, max_session_time
        self.deadlines = SessionDeadlines(protocol, factory.deadline_settings)

    # -- connection limits ----------------------------------------------------------------
    def admit(self) -> bool:
        """Count this session against the connection limits, or refuse it with 421."""
        protocol = self.protocol
        connection = protocol.commands.connection
        refusal = self._count(connection)
        if refusal is None:
            self.deadlines.start()
            if self.session.buffered:
                # Bytes that came with the PROXY header: the client did not wait either.
                connection.notes["early_talker"] = True
            return True
        self.session.close()
        protocol.transport.write(refusal.to_bytes())
        protocol.output.hang_up()
        return False

    def readmit(self, connection: Connection) -> Reply | None:
        """XCLIENT named the real client (``connection``): from now on the session counts
        under its address, not the proxy's, as if it had connected directly; the 421 when
        that address is over a limit (the caller closes the session), else None."""
        if connection.remote_ip == self._admitted_ip:
            return None  # the same client again (a proxy splitting its facts): no new count
        self.release_slot()
        return self._count(connection)

    def _count(self, connection: Connection) -> Reply | None:
        """Count the session under ``connection``'s address, or log and give the 421."""
        protocol = self.protocol
        factory = protocol.factory
        ip = connection.remote_ip
        limits = self.limits
        # the exceptions are looked up only when a per-address limit is on
        per_address = limits.max_connections_per_ip or limits.max_connection_rate
        exempt = bool(per_address) and ip in factory.connection_limit_exceptions
        limit = self.counter.admit(ip, limits, factory.clock.seconds(), exempt)
        if limit is None:
            self._admitted, self._admitted_ip = True, ip
            return None
        reason, text = _REFUSALS[limit]
        protocol.log.warn(
            "{conn_id} refused {remote_ip}:{remote_port}: {reason}",
            remote_port=connection.remote_port,
            reason=reason,
            event="connection_refused",
            limit=limit,
            **protocol.commands.log_context(),
        )
        return Reply(421, f"4.7.0 {factory.me} {text}, try again later")

    def release_slot(self) -> None:
        """The connection is gone: it no longer counts (idempotent)."""
        if self._admitted:
            self._admitted = False
            self.counter.release(self._admitted_ip)

    # -- early talk -----------------------------------------------------------------------
    def reading_before_greeting(self) -> bool:
        """True while the greeting is being prepared: keep reading to notice early talk."""
        return self.session.state is State.GREETING

    def note_early_talk(self) -> None:
        """Bytes arrived before the greeting: note it; stop reading past a bound."""
        self.protocol.commands.connection.notes["early_talker"] = True
        if self.session.buffered > EARLY_TALK_BUFFER:
            self.protocol.pause_reading()  # resumed when the greeting's hooks are done

    # -- errors and the DATA timeout --------------------------------------------------------
    def count_error(self) -> None:
        """One more protocol error or 5xx reply; at ``max_errors``, 421 and close."""
        self.errors += 1
        limit = self.limits.max_errors
        if limit and self.errors >= limit and not self.session.closed:
            protocol = self.protocol
            protocol.log.info(
                "{conn_id} too many errors ({errors})",
                errors=self.errors,
                **protocol.commands.log_context(),
            )
            self.session.send_unsolicited(
                Reply(421, f"4.7.0 {protocol.factory.me} Too many errors")
            )

    def after_reply(self, answered: Command | MessageEnd | ChunkEnd | None, reply: Reply) -> None:
        """Book-keeping once a reply went out: the error count and the phase's timeout."""
        if self.session.state is State.CLOSED:
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

    def chunk_started(self, _result: object) -> None:
        """A BDAT chunk's octets follow: they are message text (``data_timeout``)."""
        self.phase_timeout()

    def phase_timeout(self) -> None:
        """``data_timeout`` while message text is read, ``timeout`` otherwise; the data
        rate's window opens and closes with the text."""
        protocol = self.protocol
        if protocol.lost:
            return
        idle = protocol.factory.timeout
        text = self.session.state is State.DATA or self.session.reading_chunk
        want = self.limits.data_timeout_or(idle) if text else idle
        if protocol.timeOut != want:
            protocol.setTimeout(want)
        deadlines = self.deadlines
        if text:
            if deadlines.text_since is None:
                deadlines.open_text_window()
        elif deadlines.text_since is not None and not self.session.bdat_active:
            deadlines.text_since = None  # the message's text is over (BDAT's: at LAST)
