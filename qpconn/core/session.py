"""The SMTP session state machine, without any I/O.

Rules this module keeps (and no other module does):

* Which command is legal in which state: the table ``_LEGAL`` below, read at a glance.
  Out of sequence is 503, except DATA after only refused recipients: 554, as RFC 5321
  §3.3 allows (as Postfix does), so the client learns why.
* What a reply does to the state: ``send()`` looks at the pending command and the reply
  code, so the application cannot forget a transition, and the state cannot move without
  a reply going out.
* One command at a time: while a command waits for its reply, no further input is
  interpreted (pipelined commands wait in the buffer), so replies always come out in order.
* Limits on what a line may contain: length, NUL, bare CR or LF, non-ASCII. The core
  answers those itself with a 500-class reply and stays in step with the client.

Use it like h11: ``receive_data(bytes)``, then ``next_event()`` until it returns
``NEED_DATA`` or ``PAUSED``; answer each :class:`Command` and :class:`MessageEnd` with
``send(reply)``; write out ``data_to_send()``. Nothing here knows about sockets or time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from qpconn.core.bdat import ChunkEnd, ChunkingRules, ChunkStart
from qpconn.core.buffer import DataReader, take_line
from qpconn.core.events import (
    AuthResponse,
    Command,
    Event,
    MessageData,
    MessageEnd,
    ProtocolError,
)
from qpconn.core.reply import Reply
from qpconn.core.tls_auth import TLSAuthRules

__all__ = ["State", "Limits", "ServerSession", "NEED_DATA", "PAUSED", "SessionError"]


class State(enum.Enum):
    """Where the session is. Transaction states (MAIL, RCPT, DATA) imply a HELO was seen."""

    GREETING = "greeting"  # connected, the application has not greeted yet
    INIT = "init"  # greeted, no HELO/EHLO accepted yet
    READY = "ready"  # HELO/EHLO accepted, no transaction
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # at least one RCPT accepted
    DATA = "data"  # reading message text
    STARTTLS = "starttls"  # 220 to STARTTLS sent: input is discarded until tls_started()
    CLOSED = "closed"  # a closing reply was sent, or the peer went away

    # Members are singletons compared by identity: hash them by identity too, in C.
    # (Enum's own __hash__ is Python code, run on every command's check of _LEGAL.)
    __hash__ = object.__hash__


# Plain module names for the states: an Enum member looked up on its class costs ten
# times a global, and the session core looks at its state several times per command.
_GREETING = State.GREETING
_INIT = State.INIT
_READY = State.READY
_MAIL = State.MAIL
_RCPT = State.RCPT
_DATA = State.DATA
_STARTTLS = State.STARTTLS
_CLOSED = State.CLOSED


class _Sentinel(enum.Enum):
    NEED_DATA = "need-data"
    PAUSED = "paused"


#: No complete command or message piece is buffered: feed more bytes.
NEED_DATA = _Sentinel.NEED_DATA
#: A command awaits its reply (or the session is closed): call ``send`` first.
PAUSED = _Sentinel.PAUSED

_S = State
_SESSION = frozenset({_S.INIT, _S.READY, _S.MAIL, _S.RCPT})
# Which verbs are legal in which states. A verb absent here is not the core's to judge:
# it goes to the application (the unrecognized_command hook, or a protocol subclass).
_LEGAL: dict[str, frozenset[State]] = {
    "HELO": _SESSION,
    "EHLO": _SESSION,
    "MAIL": frozenset({_S.READY}),
    "RCPT": frozenset({_S.MAIL, _S.RCPT}),
    "DATA": frozenset({_S.RCPT}),
    "RSET": _SESSION,
    "NOOP": _SESSION,
    "QUIT": _SESSION,
    "VRFY": _SESSION,
    "HELP": _SESSION,
    # RFC 3207 §4 and RFC 4954 §4: after EHLO, outside a transaction (see _tls_auth_refusal
    # for "already active" / "already authenticated").
    "STARTTLS": frozenset({_S.READY}),
    "AUTH": frozenset({_S.READY}),
    # Postfix's XCLIENT: outside a transaction; its 220 starts the session over (send()).
    "XCLIENT": frozenset({_S.INIT, _S.READY}),
}
# Verbs whose argument may hold UTF-8 once SMTPUTF8 is offered (Limits.utf8).
_UTF8_VERBS = frozenset({"MAIL", "RCPT", "VRFY", "EXPN"})
# Verbs that take no argument (RFC 5321 §4.1.1); NOOP and HELP take an optional one.
_NO_ARG = frozenset({"DATA", "RSET", "QUIT", "STARTTLS"})
_NEED_ARG = frozenset({"HELO", "EHLO", "VRFY", "AUTH", "XCLIENT"})
_PREFIX = {"MAIL": "FROM:", "RCPT": "TO:"}
# Verbs with rules of their own in TLSAuthRules._tls_auth_refusal
_TLS_AUTH = frozenset({"STARTTLS", "AUTH"})
_USAGE = {
    "HELO": "Syntax: HELO hostname",
    "EHLO": "Syntax: EHLO hostname",
    "MAIL": "Syntax: MAIL FROM:<address>",
    "RCPT": "Syntax: RCPT TO:<address>",
    "VRFY": "Syntax: VRFY address",
    "AUTH": "Syntax: AUTH mechanism [initial-response]",
    "XCLIENT": "Syntax: XCLIENT attribute=value ...",
}
# The tables above, compiled into one lookup per command line: verb -> (legal states,
# takes no argument, needs one, prefix of the argument, usage text, TLS/AUTH rules apply).
_Rule = tuple[frozenset[State], bool, bool, str, str, bool]
_RULES: dict[str, _Rule] = {
    verb: (
        legal,
        verb in _NO_ARG,
        verb in _NEED_ARG,
        _PREFIX.get(verb, ""),
        f"5.5.4 {_USAGE.get(verb, '')}",
        verb in _TLS_AUTH,
    )
    for verb, legal in _LEGAL.items()
}


@dataclass
class Limits:
    """The size rules the core enforces. Defaults follow RFC 5321 §4.5.3.1."""

    #: longest command line including CRLF
    command_line: int = 512
    #: extra octets MAIL and RCPT may use for parameters (RFC 1870 grants SIZE 26)
    parameter_allowance: int = 26
    #: longest AUTH command or SASL response line including CRLF (RFC 4954 §4: 12288)
    auth_line: int = 12288
    #: longest line of message text including CRLF; 0 = unlimited
    text_line: int = 1000
    #: largest message in octets (``databytes``); 0 = unlimited
    message_size: int = 0
    #: allow UTF-8 in command lines (only once SMTPUTF8 is offered)
    utf8: bool = False
    #: offer CHUNKING: frame ``BDAT n [LAST]`` and its octets (see qpconn.core.bdat)
    chunking: bool = True
    #: speak LMTP (RFC 2033): LHLO instead of HELO/EHLO
    lmtp: bool = False
    #: store bare CR/LF in message text as CRLF instead of flagging it for refusal
    #: (config ``bare_newline normalize``); never changes what ends the text
    normalize_newlines: bool = False

    def copy(self) -> Limits:
        """An independent copy for one session (a session may change its own, e.g. LMTP).

        Made once per connection: copying the attribute dict is several times cheaper
        than ``dataclasses.replace``, which calls ``__init__`` with every field.
        """
        new = Limits.__new__(Limits)
        new.__dict__.update(self.__dict__)
        return new


class SessionError(RuntimeError):
    """The application broke the protocol contract (e.g. replied with nothing pending)."""


def _error(code: int, text: str) -> Reply:
    return Reply(code, text)


class ServerSession(TLSAuthRules, ChunkingRules):
    """The server side of one SMTP session, fed with bytes, answered with replies.

    STARTTLS and the SASL exchange of AUTH follow the rules in :mod:`qpconn.core.tls_auth`;
    BDAT chunks (CHUNKING) and LMTP's LHLO those in :mod:`qpconn.core.bdat`.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.state = _GREETING
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._pending: Command | MessageEnd | ChunkEnd | AuthResponse | None = None
        self._data: DataReader | None = None
        self._end_after_text: MessageEnd | None = None
        self._discarding = False
        #: RCPT commands in this transaction, accepted or not (for "no valid recipients").
        self.rcpt_attempts = 0
        #: the client greeted with EHLO (extensions may be used)
        self.esmtp = False
        # tls_active, authenticated and the SASL mode: see TLSAuthRules

    # -- input --------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Add bytes from the client. Nothing is interpreted until ``next_event``.

        Between a 220 reply to STARTTLS and ``tls_started()`` every byte is dropped: what
        a client sends there was sent in clear text after it asked for encryption, and
        interpreting it would let a man in the middle inject commands (CVE-2011-0411).
        """
        state = self.state
        if state is not _CLOSED and state is not _STARTTLS:
            self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet interpreted (for memory accounting)."""
        return len(self._buf)

    def next_event(self) -> Event | ChunkStart | ChunkEnd | _Sentinel:
        """The next thing that happened, NEED_DATA, or PAUSED while a reply is owed."""
        state = self.state
        if self._pending is not None or state is _GREETING or state is _CLOSED:
            return PAUSED
        if state is _STARTTLS:
            return PAUSED  # nothing is read until tls_started()
        if self._chunk is not None:
            chunk = self._next_chunk_event()  # BDAT octets: see qpconn.core.bdat
            return NEED_DATA if chunk is None else chunk
        if state is _DATA:
            return self._next_data_event()
        if not self._buf:
            return NEED_DATA  # a command or a SASL response needs bytes
        if self._sasl:
            sasl = self._next_sasl_event()
            return NEED_DATA if sasl is None else sasl
        event = self._next_command_event()
        return NEED_DATA if event is None else event

    def _next_data_event(self) -> Event | _Sentinel:
        end = self._end_after_text
        if end is not None:
            self._end_after_text = None
            self._pending = end
            return end
        reader = self._data
        assert reader is not None
        while True:
            before = len(self._buf)
            text, finished = reader.feed(self._buf)
            # Text past the size limit is dropped (None): keep reading while that
            # consumes input, or an over-long tail would wait for the next receive.
            if text or finished or len(self._buf) == before:
                break
        if finished:
            self._data = None
            end = MessageEnd(
                size=reader.size,
                oversized=reader.oversized,
                long_line=reader.long_line,
                bare_lf=reader.bare_lf,
                bare_cr=reader.bare_cr,
            )
            if text:
                # Hand out the last text first; the end follows on the next call.
                self._end_after_text = end
                return MessageData(text)
            self._pending = end
            return end
        if text:
            return MessageData(text)
        return NEED_DATA

    def _next_command_event(self) -> Event | ChunkStart | ChunkEnd | None:
        """Frame and check one command line; None when no whole line is buffered."""
        buf = self._buf
        if self._discarding:
            end = buf.find(b"\n")
            if end < 0:
                buf.clear()
                return None
            del buf[: end + 1]
            self._discarding = False
        line = take_line(buf)
        if line is None:
            if len(buf) > self._line_budget(buf):
                # Answer now and drop the rest of the line as it comes: memory stays bounded.
                buf.clear()
                self._discarding = True
                return self._protocol_error(500, "5.5.2 Line too long", b"")
            return None
        return self._check_command(line)

    def _check_command(self, line: bytes) -> Event | ChunkStart | ChunkEnd | None:
        limits = self.limits
        if len(line) < 2 or line[-2] != 13:
            return self._protocol_error(
                500, "5.5.2 Bare LF received; lines must end with CRLF", line
            )
        body = line[:-2]
        # An int is looked for with memchr; `b"\0" in body` takes the slower substring path.
        if 0 in body:
            return self._protocol_error(500, "5.5.2 NUL character in command", line)
        if 13 in body:  # CR
            return self._protocol_error(500, "5.5.2 Bare CR in command", line)
        try:
            text = body.decode("ascii")
        except UnicodeDecodeError:
            if not limits.utf8:
                return self._protocol_error(500, "5.5.2 Non-ASCII characters in command", line)
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                return self._protocol_error(500, "5.5.2 Invalid UTF-8 in command", line)
            if text.partition(" ")[0].upper() not in _UTF8_VERBS:
                # RFC 6531 §3.3: UTF-8 belongs in mailboxes, not in any other command.
                return self._protocol_error(500, "5.5.2 Non-ASCII characters in command", line)
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if limits.lmtp:
            verb, lmtp_error = self._lmtp_verb(verb, line)
            if lmtp_error is not None:
                return lmtp_error
        arg = arg.strip(" ")
        rule = _RULES.get(verb)
        allowed = limits.command_line
        if rule is None:  # not the core's to judge (see _LEGAL); BDAT is framed here
            if len(line) > allowed:
                return self._protocol_error(500, "5.5.2 Line too long", line)
            if verb == "BDAT" and limits.chunking:
                return self._bdat_command(arg, line)
            return self._issue(Command(verb, arg))
        legal, no_arg, need_arg, prefix, usage, tls_auth = rule
        if prefix:
            allowed += limits.parameter_allowance
        elif verb == "AUTH":
            allowed = max(allowed, limits.auth_line)
        if len(line) > allowed:
            return self._protocol_error(500, "5.5.2 Line too long", line)
        if tls_auth or self.bdat_active:
            refusal = self._tls_auth_refusal(verb, line) or self._chunking_refusal(verb, line)
            if refusal is not None:
                return refusal
        if self.state not in legal:
            return self._protocol_error(*self._sequence_error(verb), line)
        if arg:
            if no_arg:
                return self._protocol_error(501, f"5.5.4 Syntax: {verb} takes no argument", line)
            if prefix:
                if arg[: len(prefix)].upper() != prefix:
                    return self._protocol_error(501, usage, line)
                arg = arg[len(prefix) :]
        elif need_arg or prefix:
            return self._protocol_error(501, usage, line)
        return self._issue(Command(verb, arg))

    def _sequence_error(self, verb: str) -> tuple[int, str]:
        """503 for a command out of sequence; 554 for DATA when every RCPT was refused."""
        state = self.state
        if state is _INIT and verb in ("MAIL", "RCPT", "DATA"):
            return 503, "5.5.1 Error: send HELO/EHLO first"
        if verb == "MAIL":
            return 503, "5.5.1 Error: nested MAIL command"
        if verb in ("RCPT", "DATA") and state is _READY:
            return 503, "5.5.1 Error: need MAIL command"
        if verb == "DATA" and state is _MAIL:
            if self.rcpt_attempts:
                # RFC 5321 §3.3 allows 503 or 554 here; 554 says why.
                return 554, "5.5.1 Error: no valid recipients"
            return 503, "5.5.1 Error: need RCPT command"
        return 503, f"5.5.1 Error: {verb} not allowed now"

    def _issue(self, command: Command) -> Command:
        self._pending = command
        if command.verb == "RCPT":
            self.rcpt_attempts += 1
        return command

    def _protocol_error(self, code: int, text: str, line: bytes) -> ProtocolError:
        reply = _error(code, text)
        self._out.append(reply.to_bytes())
        if line[:5].upper() == b"AUTH ":
            line = b"AUTH <redacted>\r\n"  # an initial response carries credentials
        return ProtocolError(reply, line)

    # -- output -------------------------------------------------------------------------
    @property
    def pending(self) -> Command | MessageEnd | ChunkEnd | AuthResponse | None:
        """The command (message end, SASL response) that waits for a reply, if any."""
        return self._pending

    def greet(self, reply: Reply, close: bool = False) -> None:
        """Send the greeting (or a refusal: any non-2xx greeting closes the session)."""
        if self.state is not _GREETING:
            raise SessionError("greeting already sent")
        self._out.append(reply.to_bytes())
        if close or reply.code >= 400:
            self.close()  # releases whatever an early talker already sent
        else:
            self.state = _INIT

    def send(self, reply: Reply, close: bool = False) -> None:
        """Answer the pending command; the reply code decides the state change.

        ``close`` (or a 421/221 code) ends the session after this reply.
        """
        pending = self._pending
        if pending is None:
            raise SessionError("no command is waiting for a reply")
        self._pending = None
        self._out.append(reply.to_bytes())
        code = reply.code
        if close or code in (221, 421):
            self.close()
            return
        if type(pending) is not Command or pending.verb in _TLS_AUTH:  # commands: most
            if isinstance(pending, MessageEnd):
                self._end_transaction()
                return
            if isinstance(pending, ChunkEnd):
                if self._chunk_replied(code, pending.last):
                    self._end_transaction()
                return
            if self._tls_auth_transition(pending, code):
                return
        verb = pending.verb
        if verb == "DATA":
            if code == 354:
                self.state = _DATA
                limits = self.limits
                self._data = DataReader(
                    limits.message_size, limits.text_line, limits.normalize_newlines
                )
            return
        if not 200 <= code < 300:
            return  # a refused command changes nothing
        if verb in ("HELO", "EHLO"):
            self._end_transaction()
            self.state = _READY
            self.esmtp = verb == "EHLO"
        elif verb == "MAIL":
            self.state = _MAIL
            self.rcpt_attempts = 0
        elif verb == "RCPT":
            self.state = _RCPT
        elif verb == "RSET":
            self._end_transaction()
        elif verb == "XCLIENT" and code == 220:
            # The 220 is a new greeting: as if the client had just connected, no HELO/EHLO
            # and no AUTH (TLS, a property of the socket, stays).
            self._end_transaction()
            self.state = _INIT
            self.esmtp = self.authenticated = False

    def _end_transaction(self) -> None:
        if self.state in (_MAIL, _RCPT, _DATA):
            self.state = _READY
        self.rcpt_attempts = 0
        self._reset_chunking()

    def reset_transaction(self) -> None:
        """Forget the transaction without a command (e.g. a plugin ended it)."""
        if self.state in (_MAIL, _RCPT):
            self._end_transaction()

    def send_unsolicited(self, reply: Reply) -> None:
        """A reply no command asked for: 421 on timeout or shutdown. Ends the session."""
        self._out.append(reply.to_bytes())
        self.close()

    def close(self) -> None:
        """No more input is interpreted; buffered bytes are released."""
        self.state = _CLOSED
        self._pending = None
        self._data = None
        self._end_after_text = None
        self._chunk = None
        self._buf = bytearray()

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED

    def data_to_send(self) -> bytes:
        """All reply bytes produced since the last call, to be written in one go."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out
