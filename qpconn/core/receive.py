"""What the client sent, and the readers that cut it into what the session judges.

:class:`ReceiveBuffer` owns the bytes received and not yet read; nothing else cuts them.
There is one reader per kind of input (:class:`~qpconn.core.states.Reading`): command
lines, SASL response lines, message text, BDAT chunk octets; the session picks the one
its state machine says comes next. Rules this module keeps, and no other does:

* **Memory stays bounded between commands.** A command or SASL line that grows past its
  limit before its LF arrives is refused at once and the rest of it is dropped as it
  comes (the buffer's discard mode); a chunk's octets are handed on, or dropped, as they
  arrive. (Message text keeps its own rules: :mod:`qpconn.core.buffer`.)
* **What a command line may contain**: CRLF at its end (no bare LF), no NUL, no bare CR,
  ASCII only, except UTF-8 in MAIL, RCPT, VRFY and EXPN once SMTPUTF8 is offered (RFC 6531
  §3.3). Its length: ``Limits.command_line`` (RFC 5321 §4.5.3.1.4), MAIL and RCPT
  ``parameter_allowance`` more (RFC 1870), AUTH up to ``auth_line`` (RFC 4954 §4).
* **What a SASL response line may contain** (RFC 4954 §4): the same, ASCII only (base64
  or ``*``), up to ``auth_line``; it is never quoted in a ProtocolError, nor is an AUTH
  command line (both carry credentials).
* **BDAT chunks** (RFC 3030): ``BDAT n [LAST]`` is followed by exactly ``n`` octets that
  are never read as commands: no dot-stuffing, no line rules, no end marker (so there is
  nothing to smuggle). A refused chunk's octets are still consumed, then refused, so a
  pipelining client stays in step. ``databytes`` applies to the sum of a transaction's
  chunks: octets past it are dropped, and the chunk that went over is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from qpconn.core.buffer import DataReader, take_line
from qpconn.core.events import (
    AuthResponse,
    ChunkEnd,
    MessageData,
    MessageEnd,
    ProtocolError,
)
from qpconn.core.reply import Reply
from qpconn.core.states import LMTP_REFUSAL, LMTP_VERBS

__all__ = [
    "Limits",
    "SharedLimits",
    "ReceiveBuffer",
    "read_command_line",
    "read_sasl_response",
    "MessageText",
    "Chunks",
    "parse_bdat",
    "refuse",
]


# mypyc: a plain Python class (copy() copies its __dict__, which a native class has not)
@mypyc_attr(native_class=False)
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
    #: offer CHUNKING: frame ``BDAT n [LAST]`` and its octets
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

    def shared(self) -> SharedLimits:
        """A read-only copy that every session of a server may hold at once (the factory's
        ``limits``): one for the server instead of one per connection. A session that
        changes its limits takes its own copy first (``ServerSession.own_limits``)."""
        new = SharedLimits.__new__(SharedLimits)
        new.__dict__.update(self.__dict__)  # not setattr: SharedLimits refuses it
        return new


@mypyc_attr(native_class=False)
class SharedLimits(Limits):
    """Limits shared by many sessions (see :meth:`Limits.shared`): a change here would
    change every session at once, so it is refused; :meth:`copy` gives a changeable one."""

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(
            f"these Limits are shared by every session: change a copy "
            f"(ServerSession.own_limits(), or Limits.copy()), not {name} here"
        )

    def __delattr__(self, name: str) -> None:
        self.__setattr__(name, None)


def refuse(code: int, text: str, line: bytes = b"") -> ProtocolError:
    """The core's own refusal of ``line``; an AUTH line is never kept (credentials)."""
    if line[:5].upper() == b"AUTH ":
        line = b"AUTH <redacted>\r\n"  # an initial response carries credentials
    return ProtocolError(Reply(code, text), line)


# mypyc: a bytearray subclass cannot be a native class
@mypyc_attr(native_class=False)
class ReceiveBuffer(bytearray):
    """The bytes received and not yet read, and whether new ones are kept.

    The session adds to it (unless ``ignoring``) and the readers below cut from it; nothing
    else touches it. It is a bytearray itself so that the checks made for every command
    (is anything buffered, how much) cost what they cost on bytes. Two ways of throwing
    bytes away: the rest of one over-long line (:meth:`skip_line`), and everything, now and
    until :meth:`listen` (:meth:`ignore`: after a 220 to STARTTLS, and once closed).
    """

    __slots__ = ("ignoring", "skipping")

    def __init__(self) -> None:
        super().__init__()
        #: received bytes are dropped, not kept (set by ignore() and listen())
        self.ignoring = False
        #: the rest of an over-long line is being dropped, up to its LF (skip_line())
        self.skipping = False

    def ignore(self) -> None:
        """Drop everything buffered and everything received until :meth:`listen`."""
        self.clear()  # a bytearray cleared to nothing gives its memory back
        self.ignoring = True
        self.skipping = False

    def listen(self) -> None:
        """Keep what is received again."""
        self.ignoring = False

    def skip_line(self) -> None:
        """Drop what is buffered and the rest of the line, up to its LF, as it arrives."""
        self.clear()
        self.skipping = True

    def take_line(self) -> bytes | None:
        """The first line including its LF (a line being skipped dropped first), or None."""
        if self.skipping:
            end = self.find(b"\n")
            if end < 0:
                self.clear()
                return None
            del self[: end + 1]
            self.skipping = False
        return take_line(self)


# -- command lines ---------------------------------------------------------------------------
# Verbs whose argument may hold UTF-8 once SMTPUTF8 is offered (Limits.utf8).
_UTF8_VERBS = frozenset({"MAIL", "RCPT", "VRFY", "EXPN"})
_WITH_PARAMETERS = frozenset({"MAIL", "RCPT"})


def _line_limit(verb: str, limits: Limits) -> int:
    if verb in _WITH_PARAMETERS:
        return limits.command_line + limits.parameter_allowance
    if verb == "AUTH":
        return max(limits.command_line, limits.auth_line)
    return limits.command_line


def read_command_line(
    buffer: ReceiveBuffer, limits: Limits
) -> tuple[str, str, bytes] | ProtocolError | None:
    """``(VERB, argument, line)`` from the next command line, its refusal, or None.

    None: no whole line is buffered yet (and the buffer is within its limit). The verb is
    upper-cased (in LMTP mode, the verb it is judged as: states.LMTP_VERBS), the argument
    stripped of spaces; the line keeps its CRLF.
    """
    line = buffer.take_line() if buffer.skipping else take_line(buffer)
    if line is None:
        unfinished = "AUTH" if buffer[:5].upper() == b"AUTH " else "MAIL"
        if len(buffer) > _line_limit(unfinished, limits):
            # Answer now and drop the rest of the line as it comes: memory stays bounded.
            buffer.skip_line()
            return refuse(500, "5.5.2 Line too long")
        return None
    if len(line) < 2 or line[-2] != 13:
        return refuse(500, "5.5.2 Bare LF received; lines must end with CRLF", line)
    body = line[:-2]
    # An int is looked for with memchr; `b"\0" in body` takes the slower substring path.
    if 0 in body:
        return refuse(500, "5.5.2 NUL character in command", line)
    if 13 in body:  # CR
        return refuse(500, "5.5.2 Bare CR in command", line)
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        if not limits.utf8:
            return refuse(500, "5.5.2 Non-ASCII characters in command", line)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return refuse(500, "5.5.2 Invalid UTF-8 in command", line)
        if text.partition(" ")[0].upper() not in _UTF8_VERBS:
            # RFC 6531 §3.3: UTF-8 belongs in mailboxes, not in any other command.
            return refuse(500, "5.5.2 Non-ASCII characters in command", line)
    verb, _, arg = text.partition(" ")
    verb = verb.upper()
    if limits.lmtp and verb in LMTP_VERBS:
        lmtp_verb = LMTP_VERBS[verb]
        if lmtp_verb is None:
            return refuse(LMTP_REFUSAL.code, LMTP_REFUSAL.text, line)
        verb = lmtp_verb
    if len(line) > limits.command_line and len(line) > _line_limit(verb, limits):
        return refuse(500, "5.5.2 Line too long", line)
    return verb, arg.strip(" "), line


# -- SASL response lines ---------------------------------------------------------------------
def read_sasl_response(
    buffer: ReceiveBuffer, limits: Limits
) -> AuthResponse | ProtocolError | None:
    """The line answering a 334 challenge, its refusal (never quoting it), or None.

    A refusal ends the SASL exchange (the core sends it in place of the application's
    reply). Responses are base64 or ``*``, so anything not ASCII is refused.
    """
    limit = limits.auth_line
    line = buffer.take_line() if buffer.skipping else take_line(buffer)
    if line is None:
        if len(buffer) <= limit:
            return None
        buffer.skip_line()  # the rest of the line goes, as for a command
        return refuse(500, "5.5.2 Line too long")
    if len(line) > limit:
        return refuse(500, "5.5.2 Line too long")
    if len(line) < 2 or line[-2] != 13:
        return refuse(500, "5.5.2 Bare LF received; lines must end with CRLF")
    body = line[:-2]
    if 0 in body:  # NUL (an int is looked for with memchr)
        return refuse(500, "5.5.2 NUL character in response")
    if 13 in body:  # CR
        return refuse(500, "5.5.2 Bare CR in response")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        return refuse(501, "5.5.2 Cannot decode response")
    return AuthResponse(text.strip(" "))


# -- message text ----------------------------------------------------------------------------
class MessageText(DataReader):
    """One message's text after the 354 reply: pieces of it, then its end (and flags)."""

    __slots__ = ("_end",)

    def __init__(self, limits: Limits) -> None:
        DataReader.__init__(self, limits.message_size, limits.text_line, limits.normalize_newlines)
        self._end: MessageEnd | None = None

    def read(self, buffer: ReceiveBuffer) -> MessageData | MessageEnd | None:
        """The next piece of text, the end of the message, or None until more arrive."""
        end = self._end
        if end is not None:
            return end
        while True:
            before = len(buffer)
            text, finished = self.feed(buffer)
            # Text past the size limit is dropped (None): keep reading while that
            # consumes input, or an over-long tail would wait for the next receive.
            if text or finished or len(buffer) == before:
                break
        if finished:
            end = self._end = MessageEnd(
                size=self.size,
                oversized=self.oversized,
                long_line=self.long_line,
                bare_lf=self.bare_lf,
                bare_cr=self.bare_cr,
            )
            if not text:
                return end
            # Hand out the last text first; the end follows on the next call.
        return MessageData(text) if text else None


# -- BDAT chunks -----------------------------------------------------------------------------
#: More digits than this cannot be a chunk anyone means to send (10**18 octets).
_MAX_DIGITS = 18


def parse_bdat(arg: str) -> tuple[int, bool] | None:
    """``(size, last)`` from the argument of BDAT, or None when it is malformed."""
    words = arg.split()
    if not 1 <= len(words) <= 2:
        return None
    size = words[0]
    if not size.isascii() or not size.isdigit() or len(size) > _MAX_DIGITS:
        return None
    if len(words) == 2 and words[1].upper() != "LAST":
        return None
    return int(size), len(words) == 2


class Chunks:
    """The octets of one transaction's BDAT chunks, one chunk at a time.

    ``total`` and ``oversized`` cover every chunk of the transaction; a chunk that is
    refused (``refusal`` at :meth:`start`) has its octets dropped and counts for nothing.
    """

    __slots__ = ("_refusal", "last", "oversized", "remaining", "size", "total")

    def __init__(self) -> None:
        self.total = 0
        self.oversized = False
        self.size = self.remaining = 0
        self.last = False
        self._refusal: ProtocolError | None = None

    def start(self, size: int, last: bool, refusal: ProtocolError | None = None) -> None:
        """The next ``size`` octets are a chunk's (dropped, then ``refusal``, if given)."""
        self.size = self.remaining = size
        self.last = last
        self._refusal = refusal

    @property
    def reading(self) -> bool:
        """Octets of an accepted chunk are still to come."""
        return self._refusal is None and self.remaining > 0

    def read(
        self, buffer: ReceiveBuffer, limit: int
    ) -> MessageData | ChunkEnd | ProtocolError | None:
        """Octets of the chunk, its end (or refusal), or None until more arrive.

        ``limit`` is ``databytes`` (0: none) for the sum of the transaction's chunks.
        """
        while self.remaining and buffer:
            take = min(self.remaining, len(buffer))
            with memoryview(buffer) as view:
                piece = bytes(view[:take])
            del buffer[:take]
            self.remaining -= take
            if self._refusal is not None:
                continue
            self.total += take
            if limit and self.total > limit:
                self.oversized = True
            if not self.oversized:
                return MessageData(piece)
        if self.remaining:
            return None
        refusal, self._refusal = self._refusal, None
        if refusal is not None:
            return refusal
        return ChunkEnd(self.size, self.last, self.total, self.oversized)
