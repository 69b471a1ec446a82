"""The milter packets as small immutable messages, each with its layout both ways.

Each :class:`Message` subclass names its command letter and lays out its data:
``payload()`` writes it, ``parse()`` reads it back, field by field, and a field that is
short or a string without its NUL is a :class:`MilterProtocolError`. The tables that map
letters to classes, and the framing, are in :mod:`qpconn.milter.codec`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import ClassVar

from qpconn.milter.protocol import MAX_BODY_CHUNK, PROTOCOL_VERSION, MilterProtocolError


def _text(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise ValueError(f"a milter string cannot hold NUL: {value!r}")
    return data + b"\0"


class _Fields:
    """Reads the data of one packet, field by field; every shortfall is an error."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        self.data = data
        self.at = 0

    def fail(self, why: str) -> MilterProtocolError:
        return MilterProtocolError(f"{self.name}: {why}")

    def string(self) -> str:
        end = self.data.find(b"\0", self.at)
        if end < 0:
            raise self.fail("string without its NUL terminator")
        value = self.data[self.at : end].decode("utf-8", "surrogateescape")
        self.at = end + 1
        return value

    def integer(self, size: int) -> int:
        if len(self.data) - self.at < size:
            raise self.fail(f"too short for a {size * 8}-bit number")
        value = int.from_bytes(self.data[self.at : self.at + size], "big")
        self.at += size
        return value

    def more(self) -> bool:
        return self.at < len(self.data)

    def rest(self) -> bytes:
        value = self.data[self.at :]
        self.at = len(self.data)
        return value

    def done(self) -> None:
        if self.at != len(self.data):
            raise self.fail(f"{len(self.data) - self.at} octets left over")


@dataclass(frozen=True)
class Message:
    """One packet. Subclasses name their command letter and lay out their data.

    ``layout`` spells the data, one letter per field, in field order: ``s`` a string,
    ``i`` a 32-bit number, ``o`` a string that may be missing (None), ``a`` every string
    to the end (a tuple), ``r`` the raw octets to the end. Messages that need more
    (connect, negotiation, macros) write their own ``payload`` and ``parse``. No message
    kind derives from another, so ``isinstance`` always names exactly one kind.
    """

    code: ClassVar[bytes] = b""
    layout: ClassVar[str] = ""

    def payload(self) -> bytes:
        out = []
        for letter, item in zip(self.layout, dataclass_fields(self), strict=True):
            value = getattr(self, item.name)
            if letter == "i":
                out.append(struct.pack("!I", value))
            elif letter == "a":
                out.extend(_text(item) for item in value)
            elif letter == "r":
                out.append(value)
            elif value is not None:  # "s", and "o" when present
                out.append(_text(value))
        return b"".join(out)

    def encode(self) -> bytes:
        """The whole packet, length first."""
        body = self.code + self.payload()
        return struct.pack("!I", len(body)) + body

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        values: list[object] = []
        for letter in cls.layout:
            if letter == "i":
                values.append(fields.integer(4))
            elif letter == "a":
                items = []
                while fields.more():
                    items.append(fields.string())
                values.append(tuple(items))
            elif letter == "r":
                values.append(fields.rest())
            elif letter == "o":
                values.append(fields.string() if fields.more() else None)
            else:
                values.append(fields.string())
        return cls(*values)


def _empty(name: str, letter: bytes, doc: str) -> type[Message]:
    """A message without data: only its letter tells what it is."""
    namespace = {"code": letter, "__doc__": doc, "__qualname__": name, "__module__": __name__}
    return dataclass(frozen=True)(type(name, (Message,), namespace))


# -- both ways ----------------------------------------------------------------------------
@dataclass(frozen=True)
class OptionNegotiation(Message):
    """SMFIC_OPTNEG, and the milter's answer to it: version, actions, protocol steps.

    From a milter, ``macros`` maps a stage (:class:`Stage`) to the macro names it wants
    there (SMFIF_SETSYMLIST), space-separated as on the wire.
    """

    code: ClassVar[bytes] = b"O"
    version: int = PROTOCOL_VERSION
    actions: int = 0
    protocol: int = 0
    macros: tuple[tuple[int, str], ...] = ()

    def payload(self) -> bytes:
        data = struct.pack("!III", self.version, self.actions, self.protocol)
        return data + b"".join(struct.pack("!I", stage) + _text(n) for stage, n in self.macros)

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        version, actions, protocol = fields.integer(4), fields.integer(4), fields.integer(4)
        macros = []
        while fields.more():
            macros.append((fields.integer(4), fields.string()))
        return cls(version, actions, protocol, tuple(macros))


# -- MTA to milter ------------------------------------------------------------------------
@dataclass(frozen=True)
class DefineMacros(Message):
    """SMFIC_MACRO: the macros for the command ``stage`` (its letter), sent before it."""

    code: ClassVar[bytes] = b"D"
    stage: bytes = b"C"
    macros: tuple[tuple[str, str], ...] = ()

    def payload(self) -> bytes:
        return self.stage + b"".join(_text(name) + _text(value) for name, value in self.macros)

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        stage = bytes([fields.integer(1)])
        pairs = []
        while fields.more():
            pairs.append((fields.string(), fields.string()))
        return cls(stage, tuple(pairs))


@dataclass(frozen=True)
class Connect(Message):
    """SMFIC_CONNECT: the client's name, address family (``4``, ``6``, ``L``, ``U``),
    port and address. ``U`` (unknown) carries neither port nor address."""

    code: ClassVar[bytes] = b"C"
    hostname: str = ""
    family: bytes = b"4"
    port: int = 0
    address: str = ""

    def payload(self) -> bytes:
        data = _text(self.hostname) + self.family
        if self.family == b"U":
            return data
        return data + struct.pack("!H", self.port) + _text(self.address)

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        hostname = fields.string()
        family = bytes([fields.integer(1)])
        if family == b"U":
            return cls(hostname, family)
        if family not in (b"4", b"6", b"L"):
            raise fields.fail(f"unknown address family {family!r}")
        return cls(hostname, family, fields.integer(2), fields.string())


@dataclass(frozen=True)
class Helo(Message):
    """SMFIC_HELO: the name the client gave in HELO or EHLO."""

    code: ClassVar[bytes] = b"H"
    layout: ClassVar[str] = "s"
    name: str = ""


@dataclass(frozen=True)
class Mail(Message):
    """SMFIC_MAIL: ``<sender>`` then each ESMTP parameter (``SIZE=123``)."""

    code: ClassVar[bytes] = b"M"
    layout: ClassVar[str] = "a"
    args: tuple[str, ...] = ()

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        if not fields.more():
            raise fields.fail("no address")
        return super().parse(fields)


@dataclass(frozen=True)
class Rcpt(Message):
    """SMFIC_RCPT: ``<recipient>`` then each ESMTP parameter."""

    code: ClassVar[bytes] = b"R"
    layout: ClassVar[str] = "a"
    args: tuple[str, ...] = ()

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        if not fields.more():
            raise fields.fail("no address")
        return super().parse(fields)


@dataclass(frozen=True)
class HeaderField(Message):
    """SMFIC_HEADER: a field's name and value (folds as LF + white space)."""

    code: ClassVar[bytes] = b"L"
    layout: ClassVar[str] = "ss"
    name: str = ""
    value: str = ""


@dataclass(frozen=True)
class BodyChunk(Message):
    """SMFIC_BODY: at most :data:`MAX_BODY_CHUNK` octets of body, CRLF line ends."""

    code: ClassVar[bytes] = b"B"
    layout: ClassVar[str] = "r"
    data: bytes = b""

    def payload(self) -> bytes:
        if len(self.data) > MAX_BODY_CHUNK:
            raise ValueError(f"a body chunk holds at most {MAX_BODY_CHUNK} octets")
        return self.data


@dataclass(frozen=True)
class EndOfMessage(Message):
    """SMFIC_BODYEOB: the body is complete. libmilter allows a last piece of body in it;
    qpconn sends that piece as a BodyChunk first, as Postfix does."""

    code: ClassVar[bytes] = b"E"
    layout: ClassVar[str] = "r"
    data: bytes = b""


@dataclass(frozen=True)
class Unknown(Message):
    """SMFIC_UNKNOWN: a command the MTA does not know (qpconn never sends it)."""

    code: ClassVar[bytes] = b"U"
    layout: ClassVar[str] = "s"
    command: str = ""


Data = _empty("Data", b"T", "SMFIC_DATA: the client sent DATA.")
EndOfHeaders = _empty("EndOfHeaders", b"N", "SMFIC_EOH: the header is complete.")
Abort = _empty("Abort", b"A", "SMFIC_ABORT: the transaction ended early (RSET); no reply.")
Quit = _empty("Quit", b"Q", "SMFIC_QUIT: the session is over; no reply.")
QuitNewConnection = _empty(
    "QuitNewConnection", b"K", "SMFIC_QUIT_NC: session over, connection kept for another."
)


# -- milter to MTA ------------------------------------------------------------------------
Continue = _empty("Continue", b"c", "SMFIR_CONTINUE: go on to the next step.")
Accept = _empty("Accept", b"a", "SMFIR_ACCEPT: accept; ask nothing more of this message.")
Reject = _empty("Reject", b"r", "SMFIR_REJECT: refuse (5xx).")
Tempfail = _empty("Tempfail", b"t", "SMFIR_TEMPFAIL: refuse for now (4xx).")
Discard = _empty("Discard", b"d", "SMFIR_DISCARD: accept the message and drop it.")
Progress = _empty("Progress", b"p", "SMFIR_PROGRESS: still working; wait longer.")
Skip = _empty("Skip", b"s", "SMFIR_SKIP: send no more body chunks.")
Shutdown = _empty("Shutdown", b"4", "SMFIR_SHUTDOWN: 421, close the SMTP session.")
ConnectionFailure = _empty("ConnectionFailure", b"f", "SMFIR_CONN_FAIL: fail the SMTP connection.")

_REPLY_LINE = re.compile(r"[45]\d\d([ -])")


@dataclass(frozen=True)
class ReplyCode(Message):
    """SMFIR_REPLYCODE: the whole SMTP reply the milter wants given (``550 5.7.1 ...``),
    possibly multi-line (lines joined by CRLF, ``550-`` before the last)."""

    code: ClassVar[bytes] = b"y"
    layout: ClassVar[str] = "s"
    text: str = ""

    @property
    def lines(self) -> list[str]:
        """The text of each line, without its reply code."""
        return [line[4:] for line in self.text.split("\r\n")]

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        text = fields.string()
        lines = text.split("\r\n")
        for number, line in enumerate(lines):
            match = _REPLY_LINE.match(line)
            last = number == len(lines) - 1
            if match is None or line[:3] != text[:3] or (match.group(1) == " ") != last:
                raise fields.fail(f"not a 4xx/5xx SMTP reply: {text[:80]!r}")
        return cls(text)


@dataclass(frozen=True)
class Quarantine(Message):
    """SMFIR_QUARANTINE: hold the message, for this reason."""

    code: ClassVar[bytes] = b"q"
    layout: ClassVar[str] = "s"
    reason: str = ""


@dataclass(frozen=True)
class AddHeader(Message):
    """SMFIR_ADDHEADER: append a field at the end of the header."""

    code: ClassVar[bytes] = b"h"
    layout: ClassVar[str] = "ss"
    name: str = ""
    value: str = ""


@dataclass(frozen=True)
class InsertHeader(Message):
    """SMFIR_INSHEADER: insert a field at ``index`` among all fields (0: on top)."""

    code: ClassVar[bytes] = b"i"
    layout: ClassVar[str] = "iss"
    index: int = 0
    name: str = ""
    value: str = ""


@dataclass(frozen=True)
class ChangeHeader(Message):
    """SMFIR_CHGHEADER: change the ``index``-th field called ``name`` (1-based); an empty
    value deletes it, an index past the last such field adds one."""

    code: ClassVar[bytes] = b"m"
    layout: ClassVar[str] = "iss"
    index: int = 1
    name: str = ""
    value: str = ""


@dataclass(frozen=True)
class ReplaceBody(Message):
    """SMFIR_REPLBODY: a piece of the new body; successive pieces are concatenated."""

    code: ClassVar[bytes] = b"b"
    layout: ClassVar[str] = "r"
    data: bytes = b""


@dataclass(frozen=True)
class AddRecipient(Message):
    """SMFIR_ADDRCPT: add this recipient (``<user@host>`` or bare)."""

    code: ClassVar[bytes] = b"+"
    layout: ClassVar[str] = "s"
    address: str = ""


@dataclass(frozen=True)
class AddRecipientWithArgs(Message):
    """SMFIR_ADDRCPT_PAR: add a recipient with ESMTP parameters (``NOTIFY=NEVER``)."""

    code: ClassVar[bytes] = b"2"
    layout: ClassVar[str] = "so"
    address: str = ""
    args: str | None = None


@dataclass(frozen=True)
class DeleteRecipient(Message):
    """SMFIR_DELRCPT: remove this recipient."""

    code: ClassVar[bytes] = b"-"
    layout: ClassVar[str] = "s"
    address: str = ""


@dataclass(frozen=True)
class ChangeSender(Message):
    """SMFIR_CHGFROM: a new envelope sender, with ESMTP parameters (``args``; None: none
    sent)."""

    code: ClassVar[bytes] = b"e"
    layout: ClassVar[str] = "so"
    address: str = ""
    args: str | None = None
