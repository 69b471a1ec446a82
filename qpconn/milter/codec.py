"""Milter packets, both ways: bytes to messages and messages to bytes. No I/O.

Every packet is a 4-octet length in network order, then one command octet, then the
command's data; the length counts the command octet and the data. Data is built from
NUL-terminated strings, 32-bit and 16-bit integers in network order, single octets and
raw bytes (body chunks). The commands the MTA sends and the replies a milter sends are
two separate alphabets that happen to share letters (``'O'`` is option negotiation both
ways), so there is one decoder for each direction.

The facts come from Sendmail's ``libmilter/mfdef.h`` and Postfix's ``milter8.c``; the
numbers are the protocol's, the code is ours. Decoding is strict: a string without its
NUL, data left over after the last field, a length of zero or one past the limit, an
unknown command letter: each is a :class:`MilterProtocolError` that says which, because
a peer that gets framing wrong once cannot be trusted to be in step afterwards.

Strings are ``str``, decoded from UTF-8 with ``surrogateescape``, so any octets a milter
sends (an 8-bit header value) survive a round trip unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from qpconn.milter.messages import (
    Abort,
    Accept,
    AddHeader,
    AddRecipient,
    AddRecipientWithArgs,
    BodyChunk,
    ChangeHeader,
    ChangeSender,
    Connect,
    ConnectionFailure,
    Continue,
    Data,
    DefineMacros,
    DeleteRecipient,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    HeaderField,
    Helo,
    InsertHeader,
    Mail,
    Message,
    OptionNegotiation,
    Progress,
    Quarantine,
    Quit,
    QuitNewConnection,
    Rcpt,
    Reject,
    ReplaceBody,
    ReplyCode,
    Shutdown,
    Skip,
    Tempfail,
    Unknown,
    _Fields,
)
from qpconn.milter.protocol import (
    MAX_BODY_CHUNK,
    MAX_PACKET,
    PROTOCOL_VERSION,
    Actions,
    MilterProtocolError,
    Stage,
    Steps,
)

__all__ = [
    "MilterProtocolError", "PacketReader", "Message", "decode_command", "decode_reply",
    "MAX_BODY_CHUNK", "MAX_PACKET", "PROTOCOL_VERSION", "Actions", "Steps", "Stage",
    "OptionNegotiation", "DefineMacros", "Connect", "Helo", "Mail", "Rcpt", "Data",
    "HeaderField", "EndOfHeaders", "BodyChunk", "EndOfMessage", "Abort", "Quit",
    "QuitNewConnection", "Unknown", "Continue", "Accept", "Reject", "Tempfail", "Discard",
    "Progress", "Skip", "Shutdown", "ConnectionFailure", "ReplyCode", "Quarantine",
    "AddHeader", "InsertHeader", "ChangeHeader", "ReplaceBody", "AddRecipient",
    "AddRecipientWithArgs", "DeleteRecipient", "ChangeSender",
]  # fmt: skip

_COMMANDS: dict[bytes, type[Message]] = {
    cls.code: cls
    for cls in (OptionNegotiation, DefineMacros, Connect, Helo, Mail, Rcpt, Data, HeaderField,
                EndOfHeaders, BodyChunk, EndOfMessage, Abort, Quit, QuitNewConnection, Unknown)
}  # fmt: skip
_REPLIES: dict[bytes, type[Message]] = {
    cls.code: cls
    for cls in (OptionNegotiation, Continue, Accept, Reject, Tempfail, Discard, Progress, Skip,
                Shutdown, ConnectionFailure, ReplyCode, Quarantine, AddHeader, InsertHeader,
                ChangeHeader, ReplaceBody, AddRecipient, AddRecipientWithArgs, DeleteRecipient,
                ChangeSender)
}  # fmt: skip


def _decode(table: dict[bytes, type[Message]], side: str, code: bytes, data: bytes) -> Message:
    cls = table.get(code)
    if cls is None:
        raise MilterProtocolError(f"unknown {side} {code!r}")
    fields = _Fields(f"{cls.__name__} ({code.decode('latin-1')!r})", data)
    message = cls.parse(fields)
    fields.done()
    return message


def decode_command(code: bytes, data: bytes) -> Message:
    """A command the MTA sent (for milter-side code: tests, tools)."""
    return _decode(_COMMANDS, "MTA command", code, data)


def decode_reply(code: bytes, data: bytes) -> Message:
    """A reply a milter sent."""
    return _decode(_REPLIES, "milter reply", code, data)


class PacketReader:
    """Cuts a byte stream into packets; holds at most one incomplete packet.

    ``feed`` takes whatever arrived; ``packets`` yields each complete ``(code, data)``.
    A length of 0 or above ``limit`` is refused at once, before any of it is buffered.
    """

    def __init__(self, limit: int = MAX_PACKET) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def pending(self) -> int:
        """Octets received and not yet handed out as a packet."""
        return len(self._buffer)

    def packets(self) -> Iterator[tuple[bytes, bytes]]:
        buffer = self._buffer
        while len(buffer) >= 4:
            (length,) = struct.unpack_from("!I", buffer)
            if length < 1 or length > self.limit:
                raise MilterProtocolError(f"bad packet length {length} (1 to {self.limit} allowed)")
            if len(buffer) < 4 + length:
                return
            code, data = bytes(buffer[4:5]), bytes(buffer[5 : 4 + length])
            del buffer[: 4 + length]
            yield code, data
