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
    """One packet. Subclasses name their command letter and lay out their data."""

    code: ClassVar[bytes] = b""

    def payload(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        """The whole packet, length first."""
        body = self.code + self.payload()
        return struct.pack("!I", len(body)) + body

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        return cls()


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
    name: str = ""

    def payload(self) -> bytes:
        return _text(self.name)

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        return cls(fields.string())


@dataclass(frozen=True)
class Mail(Message):
    """SMFIC_MAIL: ``<sender>`` then each ESMTP parameter (``SIZE=123``)."""

    code: ClassVar[bytes] = b"M"
    args: tuple[str, ...] = ()

    def payload(self) -> bytes:
        return b"".join(_text(arg) for arg in self.args)

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        args = []
        while fields.more():
            args.append(fields.string())
        if not args:
            raise fields.fail("no address")
        return cls(tuple(args))


@dataclass(frozen=True)
class Rcpt(Mail):
    """SMFIC_RCPT: ``<recipient>`` then each ESMTP parameter."""

    code: ClassVar[bytes] = b"R"


@dataclass(frozen=True)
class HeaderField(Message):
    """SMFIC_HEADER: a field's name and value (folds as LF + white space)."""

    code: ClassVar[bytes] = b"L"
    name: str = ""
    value: str = ""

    def payload(self) -> bytes:
        return _text(self.name) + _text(self.value)

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        return cls(fields.string(), fields.string())


@dataclass(frozen=True)
class BodyChunk(Message):
    """SMFIC_BODY: at most :data:`MAX_BODY_CHUNK` octets of body, CRLF line ends."""

    code: ClassVar[bytes] = b"B"
    data: bytes = b""

    def payload(self) -> bytes:
        if len(self.data) > MAX_BODY_CHUNK:
            raise ValueError(f"a body chunk holds at most {MAX_BODY_CHUNK} octets")
        return self.data

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        return cls(fields.rest())


@dataclass(frozen=True)
class EndOfMessage(BodyChunk):
    """SMFIC_BODYEOB: the body is complete (libmilter allows a last piece of body in it;
    qpconn sends that piece as a BodyChunk first, as Postfix does)."""

    code: ClassVar[bytes] = b"E"


@dataclass(frozen=True)
class Unknown(Helo):
    """SMFIC_UNKNOWN: a command the MTA does not know (qpconn never sends it)."""

    code: ClassVar[bytes] = b"U"


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
    text: str = ""

    @property
    def reply_code(self) -> int:
        return int(self.text[:3])

    @property
    def lines(self) -> list[str]:
        """The text of each line, without its reply code."""
        return [line[4:] for line in self.text.split("\r\n")]

    def payload(self) -> bytes:
        return _text(self.text)

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
class Quarantine(Helo):
    """SMFIR_QUARANTINE: hold the message, for this reason."""

    code: ClassVar[bytes] = b"q"

    @property
    def reason(self) -> str:
        return self.name


@dataclass(frozen=True)
class AddHeader(HeaderField):
    """SMFIR_ADDHEADER: append a field at the end of the header."""

    code: ClassVar[bytes] = b"h"


@dataclass(frozen=True)
class InsertHeader(Message):
    """SMFIR_INSHEADER: insert a field at ``index`` among all fields (0: on top)."""

    code: ClassVar[bytes] = b"i"
    index: int = 0
    name: str = ""
    value: str = ""

    def payload(self) -> bytes:
        return struct.pack("!I", self.index) + _text(self.name) + _text(self.value)

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        return cls(fields.integer(4), fields.string(), fields.string())


@dataclass(frozen=True)
class ChangeHeader(InsertHeader):
    """SMFIR_CHGHEADER: change the ``index``-th field called ``name`` (1-based); an empty
    value deletes it, an index past the last such field adds one."""

    code: ClassVar[bytes] = b"m"


@dataclass(frozen=True)
class ReplaceBody(BodyChunk):
    """SMFIR_REPLBODY: a piece of the new body; successive pieces are concatenated."""

    code: ClassVar[bytes] = b"b"

    def payload(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class AddRecipient(Helo):
    """SMFIR_ADDRCPT: add this recipient (``<user@host>`` or bare)."""

    code: ClassVar[bytes] = b"+"

    @property
    def address(self) -> str:
        return self.name


@dataclass(frozen=True)
class DeleteRecipient(AddRecipient):
    """SMFIR_DELRCPT: remove this recipient."""

    code: ClassVar[bytes] = b"-"


@dataclass(frozen=True)
class ChangeSender(Message):
    """SMFIR_CHGFROM: a new envelope sender, with ESMTP parameters (``args``, may be
    None: none sent)."""

    code: ClassVar[bytes] = b"e"
    address: str = ""
    args: str | None = None

    def payload(self) -> bytes:
        return _text(self.address) + (b"" if self.args is None else _text(self.args))

    @classmethod
    def parse(cls, fields: _Fields) -> Message:
        address = fields.string()
        return cls(address, fields.string() if fields.more() else None)


@dataclass(frozen=True)
class AddRecipientWithArgs(ChangeSender):
    """SMFIR_ADDRCPT_PAR: add a recipient with ESMTP parameters (``NOTIFY=NEVER``)."""

    code: ClassVar[bytes] = b"2"
