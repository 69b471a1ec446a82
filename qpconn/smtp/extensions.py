"""CHUNKING/BINARYMIME, DSN and SMTPUTF8 command handling, one part of SMTPCommands.

Like :mod:`qpconn.smtp.commands`, nothing here touches a socket. The session core frames BDAT
chunks (:mod:`qpconn.core.receive`); this module answers them with the same hooks and the
same :class:`~qpconn.mail.transaction.Transaction` as DATA:

* the first chunk of a transaction runs the ``data`` hook (a refusal is given as the
  reply to that chunk, whose octets are read and dropped); the chunk octets go through
  ``message_data`` (so ``data_headers_end`` runs as with DATA); a ``LAST`` chunk ends the
  message exactly as ``.`` does: Received, ``data_post``, ``queue_pre``/``queue``/
  ``queue_post``. Every other chunk gets ``250 2.0.0 <n> octets received``.
* a refused chunk (``data`` hook, ``data_headers_end``, ``databytes`` across chunks: 552)
  ends the transaction: reset hooks run, and pipelined chunks after it get 503.
* MAIL parameters ``SMTPUTF8``, ``BODY=BINARYMIME``, ``RET``, ``ENVID`` and RCPT
  parameters ``NOTIFY``, ``ORCPT`` are checked here (see :mod:`qpconn.mail.dsn`); addresses
  may hold UTF-8 only after ``SMTPUTF8`` (else ``553 5.6.7``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from qpconn.core.events import ChunkEnd, ChunkStart, MessageEnd
from qpconn.core.reply import Reply
from qpconn.hooks.results import reply_for
from qpconn.mail.address import Address, AddressError, parse_params, split_path_and_params
from qpconn.mail.dsn import DSNError, check_mail_dsn, check_rcpt_dsn
from qpconn.mail.smtputf8 import is_smtputf8, received_protocol
from qpconn.smtp.context import CommandContext, HandlerResult

__all__ = ["ExtensionCommands", "MAIL_EXTENSION_PARAMS", "RCPT_PARAMS"]

#: MAIL parameters this module checks (SIZE and BODY are checked in qpconn.smtp.commands)
MAIL_EXTENSION_PARAMS = frozenset({"SMTPUTF8", "RET", "ENVID"})
#: every RCPT parameter the server knows
RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})


class ExtensionCommands(CommandContext):
    """The handlers; see the module docstring."""

    #: speak LMTP (:class:`qpconn.smtp.lmtp.LMTPCommands`); changes the Received word
    lmtp_mode = False

    if TYPE_CHECKING:  # the one handler of the base commands a BDAT ... LAST chunk ends in

        async def message_end(self, end: MessageEnd) -> HandlerResult: ...

    # -- EHLO -----------------------------------------------------------------------------
    def extension_ehlo_lines(self) -> list[str]:
        """CHUNKING and BINARYMIME (when the core frames BDAT), DSN, SMTPUTF8 (when on)."""
        limits = self.session.limits
        lines = ["CHUNKING", "BINARYMIME"] if limits.chunking else []
        lines.append("DSN")
        if limits.utf8:
            lines.append("SMTPUTF8")
        return lines

    # -- MAIL / RCPT arguments --------------------------------------------------------------
    def parse_mail_arg(self, arg: str) -> tuple[Address, dict[str, str | None]]:
        """The sender and parameters; UTF-8 in either only with SMTPUTF8 (AddressError)."""
        path, rest = split_path_and_params(arg)
        params = parse_params(rest, allow_utf8=self.session.limits.utf8)
        utf8 = self.session.limits.utf8 and "SMTPUTF8" in params
        if not utf8 and not rest.isascii():
            raise AddressError("non-ASCII parameter value without SMTPUTF8", utf8=True)
        return Address.parse(path, allow_utf8=utf8), params

    def parse_rcpt_arg(self, arg: str) -> tuple[Address, dict[str, str | None]]:
        """The recipient and parameters; UTF-8 only in an SMTPUTF8 transaction."""
        utf8 = self.session.limits.utf8 and is_smtputf8(self.transaction)
        path, rest = split_path_and_params(arg)
        params = parse_params(rest, allow_utf8=utf8)
        return Address.parse(path, allow_utf8=utf8), params

    def check_extension_mail_params(self, params: dict[str, str | None]) -> Reply | None:
        """SMTPUTF8 (no value, only when offered), BODY=BINARYMIME, RET and ENVID."""
        limits = self.session.limits
        if "SMTPUTF8" in params:
            if not limits.utf8:
                return Reply(555, "5.5.4 Unsupported option: SMTPUTF8")
            if params["SMTPUTF8"] is not None:
                return Reply(501, "5.5.4 Syntax: SMTPUTF8 takes no value")
        body = (params.get("BODY") or "").upper()
        if body == "BINARYMIME" and not limits.chunking:
            return Reply(555, "5.5.4 Unsupported option: BODY=BINARYMIME")
        try:
            check_mail_dsn(params)
        except DSNError as exc:
            return Reply(501, f"5.5.4 {exc}")
        return None

    def check_rcpt_params(self, params: dict[str, str | None]) -> Reply | None:
        """Only NOTIFY and ORCPT are known; both are checked (NOTIFY=NEVER stands alone)."""
        if not params:
            return None
        for key in params:
            if key not in RCPT_PARAMS:
                return Reply(555, f"5.5.4 Unsupported option: {key}")
        try:
            check_rcpt_dsn(params, utf8=is_smtputf8(self.transaction))
        except DSNError as exc:
            return Reply(501, f"5.5.4 {exc}")
        return None

    # -- DATA / BDAT ------------------------------------------------------------------------
    def data_refusal(self) -> Reply | None:
        """BODY=BINARYMIME messages must come with BDAT (RFC 3030 §3)."""
        if (self.transaction.mail_params.get("BODY") or "").upper() == "BINARYMIME":
            return Reply(503, "5.5.1 Error: BODY=BINARYMIME requires BDAT")
        return None

    async def chunk_start(self, event: ChunkStart) -> None:
        """The first chunk of a transaction runs the ``data`` hook, as DATA does."""
        if not event.first:
            return
        txn = self.transaction
        txn.notes["data_started"] = time.monotonic()
        txn.notes["chunking"] = True
        if not txn.recipients:
            self._verdict = (Reply(554, "5.5.1 Error: no valid recipients"), False)
            return
        outcome = await self.run_hook("data")
        decided = reply_for("data", outcome)
        if decided is not None and decided[0].code >= 400:
            self._verdict = decided

    async def chunk_end(self, end: ChunkEnd) -> HandlerResult:
        """One reply per chunk; the LAST one is judged as a whole message."""
        refusal: tuple[Reply, bool] | None = self._verdict
        if end.oversized:
            refusal = (Reply(552, "5.3.4 Message too big"), False)
        if refusal is None and end.last:
            return await self.message_end(MessageEnd(size=end.total))
        if refusal is None:
            return Reply(250, f"2.0.0 {end.size} octets received")
        self.log_transaction("rejected", refusal[0], size=end.total)
        await self.reset_transaction()
        return refusal

    # -- trace ------------------------------------------------------------------------------
    def received_with(self) -> str:
        """The Received ``with`` word: ESMTP, UTF8SMTPS, LMTPA ... (RFC 3848, RFC 6531)."""
        return received_protocol(self.connection, self.transaction, self.lmtp_mode)
