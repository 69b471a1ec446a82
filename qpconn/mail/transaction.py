"""Transaction: one message's envelope and content, from MAIL to end of DATA or RSET.

The body is held in memory while small and spooled to a temporary file past
``size_threshold`` bytes, so a large message costs disk, not RAM. The spool file is
removed when the transaction is closed, whichever way the transaction ends.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import IO

from qpconn.mail.address import Address
from qpconn.mail.connection import Connection, Notes
from qpconn.mail.dsn import MailDSN, RcptDSN, mail_dsn, rcpt_dsn
from qpconn.mail.header import Header, is_field_line, split_header
from qpconn.mail.spool import spool_prefix

__all__ = ["Transaction", "Recipient"]

#: Past this, header text still unparsed is treated as body: a bound on memory (Postfix
#: uses the same figure for header_size_limit).
MAX_HEADER_BYTES = 102400


class Recipient(Address):
    """A recipient address with the parameters given on its RCPT command."""

    def __init__(
        self, user: str | None, host: str | None, params: dict[str, str | None] | None = None
    ) -> None:
        super().__init__(user, host)
        self.params: dict[str, str | None] = dict(params or {})

    @classmethod
    def from_address(
        cls, address: Address, params: dict[str, str | None] | None = None
    ) -> Recipient:
        return cls(address.user, address.host, params)

    @property
    def dsn(self) -> RcptDSN:
        """NOTIFY and ORCPT (RFC 3461) from the RCPT parameters, decoded (qpconn.mail.dsn)."""
        return rcpt_dsn(self.params)


class Transaction:
    """Envelope (sender, recipients), header, body and notes of one message.

    ``connection`` points back at the session's Connection, so a plugin handed only the
    transaction can still see who is talking; a transaction made outside a session (a
    test, a tool) gets a blank one, so that ``transaction.connection`` is always there.
    """

    # Fields that start the same in every transaction read these class defaults until
    # they are set: one is made per session and per message, most sessions never reach
    # MAIL, and an instance dict of six entries is smaller and quicker to fill than one of
    # fourteen.
    sender: Address | None = None
    header: Header | None = None
    #: octets of message text received (dot-unstuffed, as stored)
    data_size = 0
    #: wall-clock time (``time.time()``) the message arrived: set by end_of_data, when
    #: its text ended (DATA's dot, the last BDAT chunk). The Received field's date and
    #: a bounce's ``Arrival-Date`` (RFC 3464 §2.2.5) both give this moment; None before.
    arrival_time: float | None = None
    _head_scan = 0  # where split_header resumes in _head
    _memory_size = 0
    _file: IO[bytes] | None = None
    _closed = False
    # The containers are made on first use: a session's first transaction is made at its
    # start and most idle sessions never use it, so five empty containers were about 300
    # of its bytes (issue 20). The public ones are properties (below); the text's two are
    # read only here, None until text arrives.
    _mail_params: dict[str, str | None] | None = None
    _recipients: list[Recipient] | None = None
    _notes: Notes | None = None
    #: header text until its end is seen
    _head: bytearray | None = None
    #: the body's pieces while it is held in memory
    _memory: list[bytes] | None = None

    def __init__(
        self,
        connection: Connection | None = None,
        *,
        id: str = "",
        size_threshold: int = 1 << 20,
        spool_dir: str | None = None,
    ) -> None:
        self.connection: Connection = connection if connection is not None else Connection()
        #: queue id, shown in the Received header, the 250 reply and the logs
        self.id = id
        self.size_threshold = size_threshold
        self.spool_dir = spool_dir

    @property
    def mail_params(self) -> dict[str, str | None]:
        """The MAIL command's parameters (``SIZE``, ``BODY``, ``SMTPUTF8``, ...)."""
        found = self._mail_params
        if found is None:
            found = self._mail_params = {}
        return found

    @mail_params.setter
    def mail_params(self, value: dict[str, str | None]) -> None:
        self._mail_params = value

    @property
    def recipients(self) -> list[Recipient]:
        """The accepted recipients, in RCPT order."""
        found = self._recipients
        if found is None:
            found = self._recipients = []
        return found

    @recipients.setter
    def recipients(self, value: list[Recipient]) -> None:
        self._recipients = value

    @property
    def notes(self) -> Notes:
        """What plugins note about this message (qpsmtpd's ``transaction->notes``)."""
        found = self._notes
        if found is None:
            found = self._notes = Notes()
        return found

    @notes.setter
    def notes(self, value: Notes) -> None:
        self._notes = value

    # -- envelope -------------------------------------------------------------------------
    @property
    def dsn(self) -> MailDSN:
        """RET and ENVID (RFC 3461) from the MAIL parameters, decoded (qpconn.mail.dsn)."""
        return mail_dsn(self.mail_params)

    @property
    def smtputf8(self) -> bool:
        """MAIL carried SMTPUTF8 (RFC 6531): addresses and header may hold UTF-8."""
        params = self._mail_params  # not the property: nothing to make for a question
        return params is not None and "SMTPUTF8" in params

    def add_recipient(
        self, recipient: Address, params: dict[str, str | None] | None = None
    ) -> Recipient:
        """Add a recipient (keeping its RCPT parameters)."""
        if not isinstance(recipient, Recipient):
            recipient = Recipient.from_address(recipient, params)
        recipients = self._recipients
        if recipients is None:
            recipients = self._recipients = []
        recipients.append(recipient)
        return recipient

    def remove_recipient(self, recipient: Address) -> None:
        """Remove every recipient equal to ``recipient`` (case-insensitive domain)."""
        self.recipients = [rcpt for rcpt in self.recipients if rcpt != recipient]

    # -- content --------------------------------------------------------------------------
    def body_write(self, data: bytes) -> bool:
        """Append message text; returns True once, at the moment the header became complete."""
        self.data_size += len(data)
        if self.header is not None:
            self._store(data)
            return False
        head = self._head
        if head:
            head += data
            data = bytes(head)
        # else the header is looked for in ``data`` itself: a large first piece of text,
        # header and the start of the body, is not copied twice for nothing.
        parts = split_header(data, self._head_scan)
        if isinstance(parts, int):
            self._head_scan = parts
            if len(data) <= MAX_HEADER_BYTES:
                if not head:
                    self._head = bytearray(data)
                return False
            parts = None
        self._finish_header(data, parts)
        return True

    def end_of_data(self) -> bool:
        """Called at the end of DATA: a header never terminated is complete now.

        Returns True when this completed the header (data_headers_end is then due).
        The message has arrived now: ``arrival_time`` is set.
        """
        self.arrival_time = time.time()
        if self.header is not None:
            return False
        raw = bytes(self._head or b"")
        parts = split_header(raw, self._head_scan)
        self._finish_header(raw, None if isinstance(parts, int) else parts)
        return True

    def _finish_header(self, raw: bytes, parts: tuple[bytes, bytes] | None) -> None:
        """Make the Header from ``raw`` (all text so far) split as ``parts``, or unsplit."""
        if parts is None:
            # Nothing ended the header: all of it is header if it starts like one.
            head, rest = (raw, b"") if is_field_line(raw) else (b"", raw)
        else:
            head, rest = parts
        self._head = None
        self.header = Header(head)
        if rest:
            self._store(rest)

    def _store(self, data: bytes) -> None:
        if self._file is None:
            memory = self._memory
            if memory is None:
                memory = self._memory = []
            memory.append(data)
            self._memory_size += len(data)
            if self._memory_size > self.size_threshold:
                self._spool_to_disk()
        else:
            self._file.write(data)

    def _spool_to_disk(self) -> None:
        self._file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open on purpose
            prefix=spool_prefix(), suffix=".spool", dir=self.spool_dir, delete=False
        )
        for piece in self._memory or ():
            self._file.write(piece)
        self._memory = None

    def replace_body(self, chunks: Iterable[bytes]) -> None:
        """Put a new body in place of the one received (a milter's SMFIR_REPLBODY).

        The new text is kept as received text is: in memory, spooled to disk past
        ``size_threshold``; the old spool file is removed. ``data_size`` still counts
        what the client sent.
        """
        if self._file is not None:
            name = self._file.name
            self._file.close()
            self._file = None
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
        self._memory = None
        self._memory_size = 0
        for chunk in chunks:
            self._store(chunk)

    @property
    def body_size(self) -> int:
        """Octets of body (without the header)."""
        if self._file is not None:
            return self._file.tell() if not self._file.closed else os.path.getsize(self._file.name)
        return self._memory_size

    @property
    def spool_path(self) -> str | None:
        """Path of the temporary body file once spooled to disk, else None."""
        return self._file.name if self._file is not None else None

    def body_chunks(self, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        """The body as stored, in pieces, from the start (may be called repeatedly)."""
        if self._file is None:
            yield from self._memory or ()
            return
        self._file.flush()
        with open(self._file.name, "rb") as body:
            while piece := body.read(chunk_size):
                yield piece

    def message_chunks(self) -> Iterator[bytes]:
        """Header (with the fields plugins added), blank line, body: what gets stored."""
        yield (self.header.as_bytes() if self.header is not None else b"") + b"\r\n"
        yield from self.body_chunks()

    def body_bytes(self) -> bytes:
        """The whole body in memory; meant for tests and small messages."""
        return b"".join(self.body_chunks())

    # -- life cycle -----------------------------------------------------------------------
    @property
    def untouched(self) -> bool:
        """Nothing was ever put here: no envelope, no notes, no text (a fresh one would
        be no different, but for its id)."""
        return (
            self.sender is None
            and not self._recipients
            and not self._notes
            and not self._mail_params
            and self.data_size == 0
            and self.header is None
            and not self._closed
        )

    def close(self) -> None:
        """Release the body and remove the spool file. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._memory = self._head = None
        if self._file is not None:
            name = self._file.name
            self._file.close()
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass

    def __repr__(self) -> str:
        return f"<Transaction {self.id} from={self.sender} rcpts={len(self.recipients)}>"
