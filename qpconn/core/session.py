"""The server side of an SMTP session, without any I/O: bytes in, events out, replies in.

Use it like h11: ``receive_data(bytes)``, then ``next_event()`` until it returns
``NEED_DATA`` or ``PAUSED``; answer each :class:`Command`, :class:`MessageEnd`,
:class:`ChunkEnd` and :class:`AuthResponse` with ``send(reply)``; write out
``data_to_send()``. Nothing here knows about sockets or time.

:class:`ServerSession` is composed of three parts, each with the rules it keeps:
:mod:`qpconn.core.states` (which command is legal when, what a reply does: tables),
:mod:`qpconn.core.receive` (the receive buffer and one reader per kind of input: line
rules, BDAT framing, limits on memory) and :mod:`qpconn.core.events`. The rules this module
keeps, and no other does:

* **One thing at a time.** While a command (a message end, a chunk, a SASL response)
  waits for its reply, no further input is interpreted: pipelined commands wait in the
  buffer, so replies always come out in order.
* **No state change without a reply.** ``send()`` looks the reply up in the transition
  table and applies the row, so the application cannot forget a transition, and the
  state cannot move without a reply going out. The core's own refusals are queued here,
  in their place among the replies.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from mypy_extensions import mypyc_attr

from qpconn.core.events import (
    AuthResponse,
    ChunkEnd,
    ChunkStart,
    Command,
    Event,
    MessageEnd,
    ProtocolError,
)
from qpconn.core.receive import (
    Chunks,
    Limits,
    MessageText,
    ReceiveBuffer,
    SharedLimits,
    parse_bdat,
    read_command_line,
    read_sasl_response,
    refuse,
)
from qpconn.core.reply import Reply
from qpconn.core.states import (
    AFTER_TRANSACTION,
    CHUNK,
    CHUNK_LINE,
    CHUNK_SIZE_UNKNOWN,
    CLOSING_CODES,
    CORE_REFUSAL,
    ENVELOPE_STATES,
    GREETING,
    IMPLICIT_TLS,
    LAST_CHUNK,
    MESSAGE_END,
    SASL_RESPONSE,
    TLS_HANDSHAKE,
    TRANSACTION_RESET,
    TRANSITIONS_BY_ANSWER,
    UNCHANGED,
    VERBS,
    CommandRule,
    Reading,
    Refusal,
    State,
    Transition,
    transition,
)

__all__ = ["State", "Limits", "ServerSession", "NEED_DATA", "PAUSED", "SessionError"]


class _Sentinel(enum.Enum):
    NEED_DATA = "need-data"
    PAUSED = "paused"


#: No complete command or message piece is buffered: feed more bytes.
NEED_DATA = _Sentinel.NEED_DATA
#: A command awaits its reply (or the session is closed): call ``send`` first.
PAUSED = _Sentinel.PAUSED

#: The TRANSITIONS rows for a reply to each event that needs one, besides a Command (whose
#: rows come with its verb: states.VERBS).
_ON_MESSAGE_END = TRANSITIONS_BY_ANSWER[MESSAGE_END]
_ON_CHUNK = TRANSITIONS_BY_ANSWER[CHUNK]
_ON_LAST_CHUNK = TRANSITIONS_BY_ANSWER[LAST_CHUNK]
_ON_SASL_RESPONSE = TRANSITIONS_BY_ANSWER[SASL_RESPONSE]


# mypyc: a RuntimeError subclass cannot be a native class
@mypyc_attr(native_class=False)
class SessionError(RuntimeError):
    """The application broke the protocol contract (e.g. replied with nothing pending)."""


class ServerSession:
    """The server side of one SMTP session, fed with bytes, answered with replies."""

    # Slots: a session per connection, its attributes read several times per command.
    __slots__ = (
        "_buffer",
        "_chunks",
        "_on_reply",
        "_out",
        "_pending",
        "_read",
        "_reads",
        "_text",
        "authenticated",
        "bdat_active",
        "esmtp",
        "limits",
        "rcpt_attempts",
        "state",
        "tls_active",
    )

    def __init__(self, limits: Limits | None = None) -> None:
        #: the size rules; often the server's, shared by all its sessions (read-only:
        #: :meth:`own_limits` gives this session a copy of its own to change)
        self.limits = limits or Limits()
        self.state = State.GREETING
        self._reads = Reading.NOTHING
        #: _READERS[self._reads], kept at hand
        self._read: Callable[[ServerSession], Event | _Sentinel] = ServerSession._read_nothing
        self._buffer = ReceiveBuffer()
        self._out: list[bytes] = []
        self._pending: Command | MessageEnd | ChunkEnd | AuthResponse | None = None
        #: the TRANSITIONS rows for a reply to what is pending (set when it is handed out)
        self._on_reply: tuple[Transition, ...] = ()
        self._text: MessageText | None = None
        self._chunks: Chunks | None = None
        #: RCPT commands in this transaction, accepted or not (for "no valid recipients").
        self.rcpt_attempts = 0
        #: the session is encrypted (STARTTLS done, or implicit TLS): see tls_started()
        self.tls_active = False
        #: a 235 reply to AUTH was sent (since the last TLS start)
        self.authenticated = False
        #: a chunk of this transaction was accepted: DATA and RCPT are out of place now
        self.bdat_active = False
        #: the client greeted with EHLO (extensions may be used)
        self.esmtp = False

    def own_limits(self) -> Limits:
        """This session's limits, to change: a copy of the shared ones, made on the first
        call (LMTP's handlers set ``lmtp`` this way), so that no other session changes."""
        limits = self.limits
        if isinstance(limits, SharedLimits):
            limits = self.limits = limits.copy()
        return limits

    # -- the flags REFUSALS rows read (states.CONDITIONS) ----------------------------------
    @property
    def recipients_refused(self) -> bool:
        return self.rcpt_attempts > 0

    @property
    def helo_only(self) -> bool:
        return not self.esmtp

    # -- input ------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Add bytes from the client. Nothing is interpreted until ``next_event``.

        Between a 220 reply to STARTTLS and ``tls_started()`` every byte is dropped: what
        a client sends there was sent in clear text after it asked for encryption, and
        interpreting it would let a man in the middle inject commands (CVE-2011-0411).
        """
        buffer = self._buffer
        if not buffer.ignoring:
            buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet interpreted (for memory accounting)."""
        return len(self._buffer)

    @property
    def reading(self) -> Reading:
        """What the next bytes from the client are, by the state machine."""
        return self._reads

    @property
    def reading_chunk(self) -> bool:
        """The octets of an accepted BDAT chunk are being read: message text, not a pause
        between commands (the adapter runs ``data_timeout`` then, as after ``354``)."""
        chunks = self._chunks
        return chunks is not None and chunks.reading

    @property
    def bdat_total(self) -> int:
        """Octets of all chunks of this transaction."""
        chunks = self._chunks
        return 0 if chunks is None else chunks.total

    def next_event(self) -> Event | _Sentinel:
        """The next thing that happened, NEED_DATA, or PAUSED while a reply is owed."""
        if self._pending is not None:
            return PAUSED
        return self._read(self)

    # One reader per kind of input (see _READERS below the class).
    def _read_nothing(self) -> _Sentinel:
        return PAUSED  # before the greeting, until tls_started(), once closed

    def _read_command(self) -> Event | _Sentinel:
        buffer = self._buffer
        if not buffer:
            return NEED_DATA  # the usual call after each command: nothing more came yet
        found = read_command_line(buffer, self.limits)
        if found is None:
            return NEED_DATA
        if isinstance(found, ProtocolError):
            return self._refused(found)
        verb, arg, line = found
        # Judged here: a refusal (states.REFUSALS), a syntax error, or a Command.
        rules = VERBS.get(verb)
        if rules is None:
            return self._issue(Command(verb, arg), ())  # not the core's to judge
        rule = rules.command
        refusal = None
        for row in rules.refusals[self.state]:  # the first whose condition holds
            when = row.when
            if when is None or getattr(self, when):
                refusal = row
                break
        if rule.offered_with:  # BDAT: the core's while CHUNKING is offered
            if not getattr(self.limits, rule.offered_with):
                return self._issue(Command(verb, arg), ())
            return self._bdat(rule, arg, line, refusal)
        if refusal is not None:
            return self._refuse(refusal, verb, line)
        if arg:
            if rule.argument == "none":
                return self._refused(refuse(501, f"5.5.4 Syntax: {verb} takes no argument", line))
            prefix = rule.prefix
            if prefix:
                if arg[: len(prefix)].upper() != prefix:
                    return self._refused(refuse(501, rule.usage, line))
                arg = arg[len(prefix) :]
        elif rule.argument == "required":
            return self._refused(refuse(501, rule.usage, line))
        command = Command(verb, arg)
        self._pending = command
        self._on_reply = rules.replies
        if verb == "RCPT":
            self.rcpt_attempts += 1
        return command

    def _read_sasl_response(self) -> Event | _Sentinel:
        buffer = self._buffer
        if not buffer:
            return NEED_DATA
        found = read_sasl_response(buffer, self.limits)
        if found is None:
            return NEED_DATA
        if isinstance(found, ProtocolError):
            return self._refused(found)
        self._pending = found
        self._on_reply = _ON_SASL_RESPONSE
        return found

    def _read_message_text(self) -> Event | _Sentinel:
        text = self._text
        if text is None:
            if not self._buffer:
                return NEED_DATA  # the usual call right after the 354
            text = self._text = MessageText(self.limits)
        found = text.read(self._buffer)
        if found is None:
            return NEED_DATA
        if type(found) is MessageEnd:
            self._pending = found
            self._on_reply = _ON_MESSAGE_END
            self._text = None
        return found

    def _read_chunk(self) -> Event | _Sentinel:
        chunks = self._chunks
        assert chunks is not None
        found = chunks.read(self._buffer, self.limits.message_size)
        if found is None:
            return NEED_DATA
        if isinstance(found, ChunkEnd):
            self._pending = found
            self._on_reply = _ON_LAST_CHUNK if found.last else _ON_CHUNK
        elif isinstance(found, ProtocolError):
            return self._refused(found)
        return found

    def _bdat(
        self, rule: CommandRule, arg: str, line: bytes, refusal: Refusal | None
    ) -> Event | _Sentinel:
        """Start reading a chunk; one out of place is read and dropped, then refused."""
        parsed = parse_bdat(arg)
        if parsed is None:
            return self._refused(refuse(501, rule.usage, line), CHUNK_SIZE_UNKNOWN)
        size, last = parsed
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = Chunks()
        self._apply(transition(CHUNK_LINE, 0))
        if refusal is not None:
            text = refusal.text.format(verb="BDAT")
            chunks.start(size, last, refuse(refusal.code, text, line))
            return self._read_chunk()
        chunks.start(size, last)
        return ChunkStart(size, last, first=not self.bdat_active)

    def _issue(self, command: Command, on_reply: tuple[Transition, ...]) -> Command:
        self._pending = command
        self._on_reply = on_reply
        return command

    def _refuse(self, refusal: Refusal, verb: str, line: bytes) -> ProtocolError:
        return self._refused(refuse(refusal.code, refusal.text.format(verb=verb), line))

    def _refused(self, error: ProtocolError, answers: str = CORE_REFUSAL) -> ProtocolError:
        """Queue the core's own refusal in its place among the replies, and apply its row."""
        self._out.append(error.reply.to_bytes())
        self._apply(transition(answers, error.reply.code))
        return error

    # -- output -----------------------------------------------------------------------------
    @property
    def pending(self) -> Command | MessageEnd | ChunkEnd | AuthResponse | None:
        """The command (message end, chunk, SASL response) that waits for a reply, if any."""
        return self._pending

    def greet(self, reply: Reply, close: bool = False) -> None:
        """Send the greeting (or a refusal: any greeting of 400 or more ends the session)."""
        if self.state is not State.GREETING:
            raise SessionError("greeting already sent")
        self._out.append(reply.to_bytes())
        if close:
            self.close()  # releases whatever an early talker already sent
        else:
            self._apply(transition(GREETING, reply.code))

    def send(self, reply: Reply, close: bool = False) -> None:
        """Answer the pending command; the transition table says what the reply does.

        ``close`` (or a 221/421 code) ends the session after this reply.
        """
        pending = self._pending
        if pending is None:
            raise SessionError("no command is waiting for a reply")
        self._pending = None
        self._out.append(reply.to_bytes())
        code = reply.code
        if close or code in CLOSING_CODES:
            self.close()
            return
        rule = UNCHANGED
        for row in self._on_reply:  # states.transition() for what was pending
            if code in row.codes:
                rule = row
                break
        self._apply(rule)

    def send_intermediate(self, reply: Reply) -> None:
        """LMTP: one of several replies to the end of a message, all but the last.

        The last one goes through ``send()``, which ends the transaction. Only legal while
        a message end (DATA's or a LAST chunk's) waits for its replies.
        """
        if not isinstance(self._pending, MessageEnd | ChunkEnd):
            raise SessionError("intermediate replies only answer the end of a message")
        self._out.append(reply.to_bytes())

    def _apply(self, rule: Transition) -> None:
        """Make the changes a row of the transition table names, in its fields' order."""
        if rule.ends_transaction:
            self.state = AFTER_TRANSACTION.get(self.state, self.state)
            self.rcpt_attempts = 0
            self.bdat_active = False
            chunks = self._chunks
            if chunks is not None:
                chunks.total = 0
                chunks.oversized = False
        if rule.to is not None:
            self.state = rule.to
        for name, value in rule.flags:  # esmtp, authenticated, tls_active, bdat_active
            setattr(self, name, value)
        reads = rule.reads
        if reads is not self._reads:
            self._reads = reads
            self._read = _READERS[reads]
            buffer = self._buffer
            if rule.drops_input:
                buffer.ignore()
            elif buffer.ignoring:
                buffer.listen()
        if rule.closes:
            self.close()

    def reset_transaction(self) -> None:
        """Forget the transaction without a command (e.g. a plugin ended it)."""
        if self.state in ENVELOPE_STATES:
            self._apply(transition(TRANSACTION_RESET, 0))

    def tls_started(self) -> None:
        """The TLS handshake is done: from here the session is encrypted.

        After STARTTLS the session starts over (RFC 3207 §4.2): no HELO/EHLO, no AUTH,
        and nothing buffered from before the handshake. With implicit TLS (called
        before the greeting) only ``tls_active`` changes.
        """
        if self.state is State.GREETING:
            self._apply(transition(IMPLICIT_TLS, 0))
        elif self.state is State.STARTTLS:
            self._apply(transition(TLS_HANDSHAKE, 0))
        else:
            raise SessionError("tls_started() without a 220 reply to STARTTLS")

    def send_unsolicited(self, reply: Reply) -> None:
        """A reply no command asked for: 421 on timeout or shutdown. Ends the session."""
        self._out.append(reply.to_bytes())
        self.close()

    def close(self) -> None:
        """No more input is interpreted; buffered bytes are released."""
        self.state = State.CLOSED
        self._reads = Reading.NOTHING
        self._read = ServerSession._read_nothing
        self._pending = None
        self._text = None
        self._chunks = None
        self._buffer.ignore()

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def data_to_send(self) -> bytes:
        """All reply bytes produced since the last call, to be written in one go."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out


#: The reader for each kind of input (states.Reading): next_event() calls the one the
#: state machine names.
_READERS: dict[Reading, Callable[[ServerSession], Event | _Sentinel]] = {
    Reading.NOTHING: ServerSession._read_nothing,
    Reading.COMMAND: ServerSession._read_command,
    Reading.SASL_RESPONSE: ServerSession._read_sasl_response,
    Reading.MESSAGE_TEXT: ServerSession._read_message_text,
    Reading.CHUNK: ServerSession._read_chunk,
}
