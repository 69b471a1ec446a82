"""The session core's rules for CHUNKING (RFC 3030's ``BDAT``) and LMTP's ``LHLO``.

Mixed into :class:`qpconn.core.session.ServerSession` (kept apart so that module stays
short); like the rest of the core it does no I/O. What it guarantees:

* ``BDAT n [LAST]`` is followed by exactly ``n`` octets that are never read as commands:
  no dot-stuffing, no line rules, no end marker (so there is nothing to smuggle). They are
  handed on raw as :class:`~qpconn.core.events.MessageData`, framed by a
  :class:`ChunkStart` (information, no reply) and a :class:`ChunkEnd` (one reply each).
* A BDAT that is out of place (no MAIL, no accepted RCPT) still has its ``n`` octets
  consumed and thrown away before the core answers ``503``, so a pipelining client stays
  in step. A size that is not a number cannot be skipped: ``501`` and the session closes.
* ``databytes`` applies to the sum of all chunks: octets past it are dropped, never
  stored, and the chunk that went over is flagged ``oversized``.
* DATA and BDAT do not mix: once a chunk was accepted, DATA and RCPT get ``503`` until the
  ``LAST`` chunk (or RSET/EHLO) ends the transaction. A refused chunk ends it too (RFC 3030
  §4.2: the client must not send more), so later pipelined chunks get ``503``.
* In LMTP mode (``Limits.lmtp``) LHLO takes EHLO's place and HELO/EHLO are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qpconn.core.events import MessageData, ProtocolError
from qpconn.core.reply import Reply

if TYPE_CHECKING:
    from qpconn.core.session import Limits, State

__all__ = ["ChunkStart", "ChunkEnd", "ChunkingRules", "parse_bdat"]

#: More digits than this cannot be a chunk anyone means to send (10**18 octets).
_MAX_DIGITS = 18
BDAT_USAGE = (501, "5.5.4 Syntax: BDAT count [LAST]")


@dataclass(frozen=True, slots=True)
class ChunkStart:
    """A BDAT command was accepted by the core; its ``size`` octets follow as MessageData.

    Information only (no reply): the application may run the ``data`` hook here when
    ``first`` (the first chunk of the transaction). The reply comes with :class:`ChunkEnd`.
    """

    size: int
    last: bool
    first: bool


@dataclass(frozen=True, slots=True)
class ChunkEnd:
    """All octets of a chunk were read: it needs exactly one reply.

    ``total`` counts every chunk of the transaction so far, ``oversized`` says that total
    went past ``databytes`` (the octets past it were dropped).
    """

    size: int
    last: bool
    total: int
    oversized: bool = False


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


@dataclass
class _Chunk:
    size: int
    last: bool
    remaining: int
    refusal: tuple[int, str] | None
    line: bytes


def _states() -> type[State]:
    from qpconn.core.session import State

    return State


class ChunkingRules:
    """BDAT framing and LHLO; see the module docstring."""

    # Provided by ServerSession.
    state: State
    limits: Limits
    esmtp: bool
    rcpt_attempts: int
    _buf: bytearray
    _out: list[bytes]
    _pending: object
    #: the chunk being read, if any
    _chunk: _Chunk | None = None
    #: a chunk of this transaction was accepted: DATA and RCPT are out of place now
    bdat_active: bool = False
    #: octets of all chunks of this transaction
    bdat_total: int = 0
    _bdat_oversized: bool = False

    @property
    def reading_chunk(self) -> bool:
        """The octets of an accepted BDAT chunk are being read: message text, not a pause
        between commands (the adapter runs ``data_timeout`` then, as after ``354``)."""
        chunk = self._chunk
        return chunk is not None and chunk.refusal is None and chunk.remaining > 0

    def _protocol_error(self, code: int, text: str, line: bytes) -> ProtocolError:
        raise NotImplementedError  # ServerSession's

    def close(self) -> None:
        raise NotImplementedError  # ServerSession's

    # -- commands ------------------------------------------------------------------------
    def _lmtp_verb(self, verb: str, line: bytes) -> tuple[str, ProtocolError | None]:
        """In LMTP mode: LHLO is judged as EHLO would be; HELO and EHLO are refused."""
        if not self.limits.lmtp:
            return verb, None
        if verb in ("HELO", "EHLO"):
            return verb, self._protocol_error(500, "5.5.1 Error: this is LMTP, use LHLO", line)
        return ("EHLO" if verb == "LHLO" else verb), None

    def _bdat_command(self, arg: str, line: bytes) -> ChunkStart | ProtocolError | None:
        """Start reading a chunk (or skipping it, when BDAT is out of place)."""
        parsed = parse_bdat(arg)
        if parsed is None:
            # The chunk's length is unknown, so its octets cannot be told from commands.
            error = self._protocol_error(*BDAT_USAGE, line)
            self.close()
            return error
        size, last = parsed
        refusal = self._bdat_refusal()
        self._chunk = _Chunk(size, last, size, refusal, line)
        if refusal is not None:
            return self._next_chunk_event()
        return ChunkStart(size, last, first=not self.bdat_active)

    def _bdat_refusal(self) -> tuple[int, str] | None:
        State = _states()
        state = self.state
        if state is State.INIT or not self.esmtp:
            return 503, "5.5.1 Error: send EHLO first"
        if state is State.READY:
            return 503, "5.5.1 Error: need MAIL command"
        if state is State.MAIL:
            if self.rcpt_attempts:
                return 554, "5.5.1 Error: no valid recipients"
            return 503, "5.5.1 Error: need RCPT command"
        if state is not State.RCPT:
            return 503, "5.5.1 Error: BDAT not allowed now"
        return None

    def _chunking_refusal(self, verb: str, line: bytes) -> ProtocolError | None:
        """DATA or RCPT in the middle of a BDAT transaction: 503 (RFC 3030 §3)."""
        if self.bdat_active and verb in ("DATA", "RCPT"):
            return self._protocol_error(
                503, f"5.5.1 Error: {verb} not allowed during a BDAT transfer", line
            )
        return None

    # -- chunk octets --------------------------------------------------------------------
    def _next_chunk_event(self) -> MessageData | ChunkEnd | ProtocolError | None:
        """Octets of the current chunk, its end, or None until more arrive."""
        chunk = self._chunk
        assert chunk is not None
        buf = self._buf
        while chunk.remaining and buf:
            take = min(chunk.remaining, len(buf))
            with memoryview(buf) as view:
                piece = bytes(view[:take])
            del buf[:take]
            chunk.remaining -= take
            if chunk.refusal is not None:
                continue
            self.bdat_total += take
            limit = self.limits.message_size
            if limit and self.bdat_total > limit:
                self._bdat_oversized = True
            if not self._bdat_oversized:
                return MessageData(piece)
        if chunk.remaining:
            return None
        self._chunk = None
        if chunk.refusal is not None:
            return self._protocol_error(*chunk.refusal, chunk.line)
        end = ChunkEnd(chunk.size, chunk.last, self.bdat_total, self._bdat_oversized)
        self._pending = end
        return end

    # -- replies -------------------------------------------------------------------------
    def _chunk_replied(self, code: int, last: bool) -> bool:
        """After the reply to a chunk: True when the transaction is over (LAST or refused)."""
        if last or not 200 <= code < 300:
            return True
        self.bdat_active = True
        return False

    def _reset_chunking(self) -> None:
        self.bdat_active = False
        self.bdat_total = 0
        self._bdat_oversized = False

    def send_intermediate(self, reply: Reply) -> None:
        """LMTP: one of several replies to the end of a message, all but the last.

        The last one goes through ``send()``, which ends the transaction. Only legal while
        a message end (DATA's or a LAST chunk's) waits for its replies.
        """
        from qpconn.core.events import MessageEnd

        pending = self._pending
        if not isinstance(pending, MessageEnd | ChunkEnd):
            from qpconn.core.session import SessionError

            raise SessionError("intermediate replies only answer the end of a message")
        self._out.append(reply.to_bytes())
