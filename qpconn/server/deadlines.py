"""Deadlines: what a session may take however slowly it trickles (Postfix 3.7's model).

The idle timer (``timeout``, ``data_timeout``) starts over with every byte received, so a
client sending one byte every few seconds never meets it and holds its session forever.
Three limits that no byte resets, from Postfix 3.7's ``smtpd_per_request_deadline`` and
``smtpd_min_data_rate``:

* ``command_deadline``: a command line (or a SASL response) must be complete within this
  many seconds of its first byte.
* ``min_data_rate`` after ``data_rate_grace``: ``t`` seconds into a message's text (after
  ``354``, or from its first ``BDAT`` chunk to the last), the client must have sent
  ``min_data_rate * (t - data_rate_grace)`` octets. As Postfix, which adds ``N /
  smtpd_min_data_rate`` seconds to the deadline for every ``N`` octets read, this is an
  average: a fast start earns time for a pause later.
* ``max_session_time``: the first command that arrives after that many seconds of session
  gets the ``421`` instead of an answer. A command or a message in progress is never cut
  by it (the other deadlines bound those).

Each ends the session with ``421 4.4.2`` and one log line (``event="deadline"``,
``limit=`` the setting, ``reason=`` in words), which the metric
``qpconn_deadlines_total{limit=...}`` counts. A client that does not read its replies is
the adapter's business (see :mod:`qpconn.server.protocol`, backpressure); it logs the same
event with ``limit="timeout"``.

The clocks run only while the server waits for the client. While a hook of ours is at work
or the client is not taking its replies, the adapter reads nothing and the time is not the
client's; when that ends (:meth:`SessionDeadlines.resume`), the line's clock and the
message's window start over.

Where the cost goes: message text arrives in every session and a partial command line
almost never does. So the data rate and the session's length are checked as bytes arrive
(a comparison per read, no timer per message); a client that stops sending altogether is
the idle timer's. A partial command line, left after the adapter has read every whole
one, gets one timer, which cuts it exactly at its deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall

from qpconn.core.reply import Reply
from qpconn.core.session import State

if TYPE_CHECKING:
    from qpconn.server.protocol import SMTPServerProtocol
    from qpconn.smtp.limits import SessionLimits

__all__ = ["DeadlineSettings", "SessionDeadlines"]

#: where the server waits for a command line (or a SASL response) from the client
_COMMAND_STATES = frozenset({State.INIT, State.READY, State.MAIL, State.RCPT})

#: limit -> the reply's words after ``421 4.4.2 <me>``
_REPLIES = {
    "command_deadline": "Error: timeout exceeded (command line too slow)",
    "min_data_rate": "Error: timeout exceeded (message data too slow)",
    "max_session_time": "Error: session time limit exceeded",
}


@dataclass(frozen=True, slots=True)
class DeadlineSettings:
    """The four settings as the sessions apply them, worked out once per server (the
    factory's ``deadline_settings``): unset ones follow the idle timeouts."""

    #: seconds from a command line's first byte to its end; None: no deadline
    command_deadline: float | None
    #: octets per second after the grace; 0: no minimum
    min_data_rate: int
    data_rate_grace: float
    #: seconds; 0: no limit
    max_session_time: float

    @classmethod
    def from_limits(cls, limits: SessionLimits, idle: float) -> DeadlineSettings:
        """From the config's limits and the idle ``timeout``."""
        return cls(
            limits.command_deadline_for(idle),
            limits.min_data_rate,
            limits.data_rate_grace_for(idle),
            limits.max_session_time,
        )


class SessionDeadlines:
    """The deadlines of one session; see the module docstring.

    The adapter tells it what happens: :meth:`start` when the session begins,
    :meth:`input_arrived` with each read, :meth:`input_left` after a read that did not end
    a line, :meth:`resume` when it reads again after a pause of its own, :meth:`stop` when
    the connection is gone. The guard opens the window of message text
    (:meth:`open_text_window`) and closes it (``text_since = None``) with the replies.
    """

    # One per session, idle ones included: fields only, no attribute dict.
    __slots__ = (
        "_line_offset",
        "_line_timer",
        "_text_offset",
        "clock",
        "line_since",
        "protocol",
        "session",
        "session_ends",
        "settings",
        "text_since",
    )  # fmt: skip

    def __init__(self, protocol: SMTPServerProtocol, settings: DeadlineSettings) -> None:
        self.protocol = protocol
        self.session = protocol.session
        self.clock = protocol.factory.clock
        self.settings = settings
        #: when the session's time is up (infinity: never)
        self.session_ends = math.inf
        #: when the partial command line began (None: none is pending), and its offset in
        #: the client's byte stream, which tells that line from the next one
        self.line_since: float | None = None
        self._line_offset = 0
        self._line_timer: IDelayedCall | None = None
        #: when the window of message text began (None: no text is being read), and the
        #: client's offset then: the octets since are what the rate is measured on. From
        #: the 354, or the first BDAT chunk, to the reply that ends the message: the time
        #: between a BDAT message's chunks is the client's as well
        self.text_since: float | None = None
        self._text_offset = 0

    # -- what the adapter reports -------------------------------------------------------
    def start(self) -> None:
        """The session begins (admitted, greeting on its way): its own clock starts."""
        limit = self.settings.max_session_time
        if limit:
            self.session_ends = self.clock.seconds() + limit

    def input_arrived(self) -> bool:
        """Bytes arrived (already counted in ``protocol.bytes_received``): True when a
        deadline had passed, the 421 is on its way and the bytes must not be read."""
        now = self.clock.seconds()
        since = self.text_since
        if since is not None:
            settings = self.settings
            octets = self.protocol.bytes_received - self._text_offset
            if now <= since + settings.data_rate_grace + octets / settings.min_data_rate:
                return False
            expired = "min_data_rate"
        elif now < self.session_ends or self.session.state not in _COMMAND_STATES:
            return False
        else:
            expired = "max_session_time"
        if self.protocol.held:
            return False  # bytes a TLS layer hands on while a hook of ours runs
        self._expire(expired, now)
        return True

    def input_left(self) -> None:
        """A read did not end a line: if the bytes left unread are the start of a command
        line the client has not finished, that line's deadline runs. (A read that ends
        with a line end leaves no command line unfinished.)"""
        due = self.settings.command_deadline
        if due is None or not self._waiting_for_line():
            return
        offset = self._unread_offset()
        if self.line_since is not None and offset == self._line_offset:
            return  # the same line, still growing
        now = self.clock.seconds()
        self.line_since, self._line_offset = now, offset
        timer = self._line_timer
        if timer is None or not timer.active():
            self._line_timer = self.clock.callLater(due, self._line_due)
        else:
            timer.reset(due)

    def open_text_window(self) -> None:
        """Message text follows (a ``354``, a chunk's octets): its rate is measured from now.

        Octets already buffered arrived in time: they count.
        """
        if self.settings.min_data_rate:
            self.text_since = self.clock.seconds()
            self._text_offset = self._unread_offset()

    def resume(self) -> None:
        """The adapter reads again after a pause of its own (a hook, unread replies): the
        time that passed was not the client's, so the line's clock and the text's window
        start over (the next pass finds a partial line again)."""
        self.line_since = None
        if self.text_since is not None:
            self.open_text_window()

    def stop(self) -> None:
        """The connection is gone: no timer may outlive it (it holds this session)."""
        timer = self._line_timer
        if timer is not None and timer.active():
            timer.cancel()
        self._line_timer = None

    # -- the checks ---------------------------------------------------------------------
    def _unread_offset(self) -> int:
        """Where, in the client's byte stream, the first byte not yet interpreted is."""
        return self.protocol.bytes_received - self.session.buffered

    def _waiting_for_line(self) -> bool:
        """Bytes are buffered and the server waits for the rest of their line: the client's
        turn, not ours (no hook at work, replies taken, no message text being read)."""
        session = self.session
        return (
            session.state in _COMMAND_STATES
            and session.buffered > 0
            and not session.reading_chunk
            and not self.protocol.held
        )

    def _line_due(self) -> None:
        self._line_timer = None
        if self.line_since is None or self.protocol.lost:
            return
        if not self._waiting_for_line() or self._unread_offset() != self._line_offset:
            self.line_since = None  # finished, or our turn now: resume() starts it over
            return
        now = self.clock.seconds()
        late = self.line_since + (self.settings.command_deadline or 0.0) - now
        if late > 0:  # the line began again later than this timer was set for
            self._line_timer = self.clock.callLater(late, self._line_due)
            return
        self._expire("command_deadline", now)

    def _expire(self, limit: str, now: float) -> None:
        """421 and close: the client overran ``limit``."""
        protocol = self.protocol
        settings = self.settings
        if limit == "command_deadline":
            seconds = settings.command_deadline
            reason = f"command line not complete {seconds:g}s after its first byte"
        elif limit == "min_data_rate" and self.text_since is not None:
            octets = protocol.bytes_received - self._text_offset
            reason = (
                f"message text under {settings.min_data_rate} octets/s after the grace: "
                f"{octets} octets in {now - self.text_since:.1f}s"
            )
        else:
            reason = f"session longer than {settings.max_session_time:g}s"
        self.text_since = self.line_since = None
        protocol.log.info(
            "{conn_id} deadline: {reason}",
            reason=reason,
            event="deadline",
            limit=limit,
            **protocol.log_context(),
        )
        protocol.close_with(Reply(421, f"4.4.2 {protocol.factory.me} {_REPLIES[limit]}"))
