"""Events the session core hands to the application.

They are small immutable records, as in h11: the core decides *what happened* on the wire,
the application decides *what to answer*. Each is a named tuple: fields by name, none can
be set, and made at the cost of a tuple (a frozen dataclass sets each field through
``object.__setattr__``: a message's five events cost 2.3 µs that way, 1.5 as named tuples,
on workload ii's path). Compare events by type and fields, not with plain tuples.

A :class:`Command`, a :class:`MessageEnd`, a :class:`ChunkEnd` and an :class:`AuthResponse`
each need exactly one reply through :meth:`qpconn.core.session.ServerSession.send`; the
other events are information only.
Every event the core hands out is one of :data:`Event`.
"""

from __future__ import annotations

from typing import NamedTuple

from qpconn.core.reply import Reply

__all__ = [
    "AuthResponse",
    "ChunkEnd",
    "ChunkStart",
    "Command",
    "MessageData",
    "MessageEnd",
    "ProtocolError",
    "Event",
]


class Command(NamedTuple):
    """A command line that passed the core's checks and waits for the application's reply.

    ``verb`` is upper-case. ``arg`` is the rest of the line without the separating space;
    for MAIL and RCPT it is what follows ``FROM:`` / ``TO:`` (leading spaces kept, since a
    ``mail_pre`` plugin may want to see exactly what the client sent).
    """

    verb: str
    arg: str = ""


class MessageData(NamedTuple):
    """A piece of message text, already dot-unstuffed, in arrival order."""

    data: bytes


class MessageEnd(NamedTuple):
    """The end-of-data marker arrived; the application must answer the whole message.

    The flags report what the core saw while reading; it never stores anything itself,
    so a message it flags was still read to its end and the session stays in step.
    """

    size: int
    oversized: bool = False
    long_line: bool = False
    bare_lf: bool = False
    bare_cr: bool = False


class ProtocolError(NamedTuple):
    """The core answered a bad command itself (the reply is already queued).

    Reported so that the application can log it and count errors per session.
    """

    reply: Reply
    line: bytes = b""


class AuthResponse(NamedTuple):
    """A line the client sent in answer to a ``334`` SASL challenge (RFC 4954 §4).

    It is not a command: after a 334 reply to AUTH the next line belongs to the SASL
    exchange, whatever it looks like (``RSET`` there is a malformed response, never a
    reset). ``data`` is the line without its CRLF, ASCII only (base64 or ``*``). It needs
    exactly one reply, like a Command: 334 continues the exchange, 235 ends it
    authenticated, anything else ends it. Its ``repr`` hides the data: it carries
    credentials, which must never reach a log.
    """

    data: str

    def __repr__(self) -> str:
        return f"AuthResponse(<{len(self.data)} characters>)"


class ChunkStart(NamedTuple):
    """A BDAT command was accepted by the core; its ``size`` octets follow as MessageData.

    Information only (no reply): the application may run the ``data`` hook here when
    ``first`` (the first chunk of the transaction). The reply comes with :class:`ChunkEnd`.
    """

    size: int
    last: bool
    first: bool


class ChunkEnd(NamedTuple):
    """All octets of a chunk were read: it needs exactly one reply.

    ``total`` counts every chunk of the transaction so far, ``oversized`` says that total
    went past ``databytes`` (the octets past it were dropped).
    """

    size: int
    last: bool
    total: int
    oversized: bool = False


Event = Command | MessageData | MessageEnd | ProtocolError | AuthResponse | ChunkStart | ChunkEnd
