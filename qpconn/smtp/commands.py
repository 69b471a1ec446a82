"""SMTP command handlers: each command becomes hook runs and one reply.

This is qpsmtpd's ``Qpsmtpd::SMTP`` in Python: the session core has already checked the
line and the command sequence; here the hooks run in order and their outcome picks the
reply (through :func:`qpconn.hooks.results.reply_for`). Nothing here touches a socket: the
protocol adapter owns one :class:`SMTPCommands` per connection, calls
:meth:`SMTPCommands.dispatch` and writes what comes back.

Subclass it to change the conversation: override :meth:`greeting`, :meth:`ehlo_lines`,
any ``smtp_<VERB>`` handler, or add one for a new verb (``async def smtp_XFORWARD(self,
arg)``); a handler returns a :class:`~qpconn.core.reply.Reply` or ``(Reply, close)``. Plug
the subclass in with ``SMTPFactory(commands=...)`` or ``make_service(..., commands=...)``.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Coroutine
from typing import Any

import qpconn
from qpconn.core.events import AuthResponse, ChunkEnd, Command, MessageEnd
from qpconn.core.reply import Reply
from qpconn.hooks.results import DONE, OK, reply_for
from qpconn.mail.address import AddressError
from qpconn.mail.received import received_value
from qpconn.smtp.context import HandlerResult
from qpconn.smtp.extensions import MAIL_EXTENSION_PARAMS, ExtensionCommands
from qpconn.smtp.security import TLSAuthCommands
from qpconn.smtp.xclient import XClientCommands

__all__ = ["SMTPCommands", "HandlerResult"]

SOFTWARE = f"qpconn {qpconn.__version__}"

_MAIL_PARAMS = frozenset({"SIZE", "BODY"}) | MAIL_EXTENSION_PARAMS
_BODY_TYPES = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})
# Replies that never change, built once (Reply objects are not modified once made)
_OK = Reply(250, "2.0.0 OK")
_GO_AHEAD = Reply(354, "End data with <CR><LF>.<CR><LF>")


def _positive(decided: tuple[Reply, bool] | None) -> bool:
    """No plugin refused (None), or a plugin's own reply is 2xx: the command takes effect.

    The effect follows the reply the client gets, as the session core's state does, so
    the two never disagree (a DONE plugin answering 250 to MAIL sets the sender).
    """
    return decided is None or 200 <= decided[0].code < 300


class SMTPCommands(TLSAuthCommands, ExtensionCommands, XClientCommands):
    """The handlers of one session; see the module docstring.

    STARTTLS and AUTH are in :class:`qpconn.smtp.security.TLSAuthCommands`; BDAT, DSN
    and SMTPUTF8 in :class:`qpconn.smtp.extensions.ExtensionCommands`; XCLIENT in
    :class:`qpconn.smtp.xclient.XClientCommands`; the state they all
    share (connection, transaction, settings, hooks, logging) in
    :class:`qpconn.smtp.context.CommandContext`.
    """

    # -- connection start ---------------------------------------------------------------
    def greeting(self) -> str:
        """The 220 text: config ``smtpgreeting`` (with ESMTP added) or a default."""
        text = self.config.get("smtpgreeting")
        if text:
            return text if "ESMTP" in text.split() else f"{text} ESMTP"
        return f"{self.me} ESMTP {SOFTWARE} ready"

    async def start_session(self) -> tuple[Reply, bool]:
        """pre-connection and connect hooks, then the greeting (or a refusal)."""
        for hook in ("pre-connection", "connect"):
            outcome = await self.run_hook(hook)
            if outcome.result is DONE and not outcome.message:
                break
            decided = reply_for(hook, outcome)
            if decided is not None:
                self.log.info(
                    "{conn_id} refused at {hook} by {plugin}: {code}",
                    hook=hook,
                    plugin=outcome.plugin,
                    code=decided[0].code,
                    event="rejection",
                    result="rejected",
                    **self.log_context(),
                )
                return decided
        return Reply(220, self.greeting()), False

    # -- dispatch -------------------------------------------------------------------------
    def dispatch(
        self, event: Command | MessageEnd | ChunkEnd | AuthResponse
    ) -> Coroutine[Any, Any, HandlerResult]:
        """The reply to one command (or to the end of a message, or to a SASL response).

        It returns the handler's own coroutine, to be awaited: a coroutine of its own
        around it would cost a layer on every command for nothing.
        """
        if type(event) is not Command:  # commands first: they are most of the traffic
            if isinstance(event, MessageEnd):
                return self.message_end(event)
            if isinstance(event, ChunkEnd):
                return self.chunk_end(event)
            if isinstance(event, AuthResponse):
                return self.auth_response(event.data)
        handler = self._handlers.get(event.verb)
        if handler is None:
            return self.unrecognized_command(event.verb, event.arg)
        coro: Coroutine[Any, Any, HandlerResult] = handler(self, event.arg)
        return coro

    #: verb -> its ``smtp_<VERB>`` handler function, made once per class (see
    #: :func:`_handler_table`): a command costs one dict lookup, not a name built and
    #: looked up along the class's bases each time
    _handlers: dict[str, Callable[..., Coroutine[Any, Any, HandlerResult]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers = _handler_table(cls)

    # -- HELO / EHLO ----------------------------------------------------------------------
    async def smtp_HELO(self, arg: str) -> HandlerResult:
        return await self._hello("helo", arg)

    async def smtp_EHLO(self, arg: str) -> HandlerResult:
        return await self._hello("ehlo", arg)

    def ehlo_lines(self) -> list[str]:
        """The extensions advertised after EHLO, one per line."""
        lines = ["PIPELINING", "8BITMIME", f"SIZE {self.databytes}", "ENHANCEDSTATUSCODES"]
        lines += self.tls_auth_ehlo_lines()  # STARTTLS, AUTH ...: see smtp_security
        lines += self.extension_ehlo_lines()  # CHUNKING, DSN, SMTPUTF8: smtp_extensions
        lines += self.xclient_ehlo_lines()  # XCLIENT, to xclient_hosts only: smtp/xclient.py
        extra = self.transaction.notes.get("capabilities") or []
        return lines + [str(item) for item in extra]

    async def _hello(self, kind: str, host: str) -> HandlerResult:
        conn = self.connection
        previous = conn.hello, conn.hello_host
        # Empty while the hooks judge the name: a plugin must not trust what it is judging.
        conn.hello = conn.hello_host = None
        # The hooks judge on a fresh transaction (where an ehlo hook may note capabilities
        # to advertise). The open one is set aside: a refused HELO changes nothing, as the
        # core keeps its state too, so the transaction must keep its sender; dropping it
        # would let the next RCPT and DATA store the message with a null sender that no
        # mail hook ever judged.
        old = self.transaction
        decided = None
        # Without a hook to judge the name, an untouched transaction simply goes on: a new
        # one and the old one's end would change nothing.
        if self.runner.has(kind) or not old.untouched:
            self.transaction = self.new_transaction()
            outcome = await self.run_hook(kind, host)
            decided = reply_for(kind, outcome)
            if not _positive(decided):
                self.transaction.close()
                self.transaction = old
                conn.hello, conn.hello_host = previous
                return decided
            # An accepted HELO/EHLO ends the open transaction, as RSET would (RFC 5321
            # §4.1.4).
            await self.end_transaction(old)
        conn.hello, conn.hello_host = kind, host
        if decided is not None:
            return decided
        first = f"{self.me} Hi {conn.remote_host_or_unknown} [{conn.remote_ip or 'unix'}]"
        if kind == "helo":
            return Reply(250, first)
        return Reply(250, [first, *self.ehlo_lines()])

    async def pre_hook(self, hook: str, arg: str) -> tuple[str, tuple[Reply, bool] | None]:
        """``mail_pre`` / ``rcpt_pre``: a plugin may rewrite the argument (OK with the new
        text) or decide the command before its address is even parsed."""
        if hook not in self.runner.used:
            return arg, None  # no plugin to ask: the argument as the client sent it
        outcome = await self.run_hook(hook, arg)
        if outcome.result is OK and outcome.message is not None:
            return outcome.message, None
        return arg, reply_for(hook, outcome)

    # -- MAIL -----------------------------------------------------------------------------
    async def smtp_MAIL(self, arg: str) -> HandlerResult:
        if self.trace is not None:  # tracing: the transaction's span starts at its MAIL
            self.trace.transaction_started(self.transaction)
        refusal = self.tls_refusal_for_mail()  # tls_required: 530 before any hook
        if refusal is not None:
            return refusal
        arg, decided = await self.pre_hook("mail_pre", arg)
        if decided is not None:
            return decided
        try:
            sender, params = self.parse_mail_arg(arg)  # SMTPUTF8: see smtp_extensions
        except AddressError as exc:
            code = 553 if exc.utf8 else 501
            return Reply(code, f"{'5.6.7' if exc.utf8 else '5.1.7'} Bad sender address syntax")
        if params:  # without parameters there is nothing to check
            problem = self.check_mail_params(params) or self.check_extension_mail_params(params)
            if problem is not None:
                if problem.code == 552:  # SIZE= over databytes: a policy refusal, say so
                    self.log_limit(
                        "mail", "databytes", problem, sender=sender.format(),
                        size=params.get("SIZE"), databytes=self.databytes,
                    )  # fmt: skip
                return problem
        outcome = await self.run_hook("mail", sender, params)
        decided = reply_for("mail", outcome)
        if not _positive(decided):
            assert decided is not None
            self.log_rejection("mail", outcome, decided[0], decided[1], sender=sender.format())
            return decided
        self.transaction.sender = sender
        self.transaction.mail_params = params
        return decided or Reply(250, f"2.1.0 {sender.format()}, sender OK")

    def check_mail_params(self, params: dict[str, str | None]) -> Reply | None:
        """Refuse what MAIL parameters the server does not offer, or a SIZE too big."""
        if params and not self.session.esmtp:
            return Reply(555, "5.5.4 MAIL parameters require EHLO")
        for key in params:
            if key not in _MAIL_PARAMS:
                return Reply(555, f"5.5.4 Unsupported option: {key}")
        size = params.get("SIZE", "0")
        if "SIZE" in params and (size is None or not size.isdigit() or len(size) > 20):
            return Reply(501, "5.5.4 Syntax: SIZE=<number>")
        if self.databytes and size is not None and int(size) > self.databytes:
            return Reply(552, "5.3.4 Message size exceeds fixed maximum message size")
        body = params.get("BODY", "7BIT")
        if body is None or body.upper() not in _BODY_TYPES:
            return Reply(501, "5.5.4 Syntax: BODY=7BIT|8BITMIME|BINARYMIME")
        return None

    # -- RCPT -----------------------------------------------------------------------------
    async def smtp_RCPT(self, arg: str) -> HandlerResult:
        limit = self.session_limits.max_rcpt
        if limit and len(self.transaction.recipients) >= limit:
            # Before any hook: past the limit nothing about the address matters.
            refusal = Reply(452, "4.5.3 Too many recipients")
            self.log_limit("rcpt", "max_rcpt", refusal, max_rcpt=limit)
            return refusal
        arg, decided = await self.pre_hook("rcpt_pre", arg)
        if decided is not None:
            return decided
        try:
            recipient, params = self.parse_rcpt_arg(arg)
        except AddressError as exc:
            code = 553 if exc.utf8 else 501
            return Reply(code, f"{'5.6.7' if exc.utf8 else '5.1.3'} Bad recipient address syntax")
        if recipient.is_null:
            return Reply(501, "5.1.3 Bad recipient address syntax")
        problem = self.check_rcpt_params(params)  # NOTIFY, ORCPT: see smtp_extensions
        if problem is not None:
            return problem
        outcome = await self.run_hook("rcpt", recipient, params)
        decided = reply_for("rcpt", outcome)
        if not _positive(decided):
            assert decided is not None
            self.log_rejection("rcpt", outcome, decided[0], decided[1], rcpt=recipient.format())
            return decided
        self.transaction.add_recipient(recipient, params)
        return decided or Reply(250, f"2.1.5 {recipient.format()}, recipient ok")

    # -- DATA -----------------------------------------------------------------------------
    async def smtp_DATA(self, arg: str) -> HandlerResult:
        if not self.transaction.recipients:
            return Reply(554, "5.5.1 Error: no valid recipients")
        refusal = self.data_refusal()  # BODY=BINARYMIME needs BDAT
        if refusal is not None:
            return refusal
        outcome = await self.run_hook("data")
        decided = reply_for("data", outcome)
        if decided is not None:
            return decided
        self.transaction.notes["data_started"] = time.monotonic()
        return _GO_AHEAD

    async def message_data(self, data: bytes) -> None:
        """Store a piece of message text; run data_headers_end once the header is complete."""
        if not self.store_message_data(data):
            await self.headers_end()

    def store_message_data(self, data: bytes) -> bool:
        """Store a piece of message text; False when the data_headers_end hook must run now.

        Synchronous, so the adapter runs no coroutine per piece of text when no plugin
        hooks data_headers_end (the common case).
        """
        if self._verdict is not None:
            return True
        try:
            headers_done = self.transaction.body_write(data)
        except OSError as exc:
            # The spool disk is full or failing: the text is incomplete, so the message
            # must not be accepted. The rest of the text is ignored; the end gets a 4xx.
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            text = "4.3.1 Insufficient system storage" if full else "4.3.0 Cannot store message"
            self._verdict = (Reply(452 if full else 451, text), False)
            return True
        return not (headers_done and self.runner.has("data_headers_end"))

    async def headers_end(self) -> None:
        """The header is complete: run ``data_headers_end``; a refusal is given at the end."""
        if not self.runner.has("data_headers_end"):
            return
        outcome = await self.run_hook("data_headers_end")
        decided = reply_for("data_headers_end", outcome)
        if decided is not None:
            # Remembered and given when the message ends; a disconnect can't wait.
            self._verdict = decided
            if decided[1]:
                self.session.send_unsolicited(decided[0])

    async def message_end(self, end: MessageEnd) -> HandlerResult:
        """The reply to a whole message: size and line checks, data_post, then queue."""
        try:
            return await self._judge_message(end)
        finally:
            await self.reset_transaction()

    async def _judge_message(self, end: MessageEnd) -> HandlerResult:
        txn = self.transaction
        refusal = self.refuse_message_text(end)
        if refusal is not None:
            self.log_transaction("rejected", refusal, hook="data", size=end.size)
            return refusal
        if txn.end_of_data() and self._verdict is None:
            await self.headers_end()
        if self._verdict is not None:
            self.log_transaction("rejected", self._verdict[0], hook="data_headers_end")
            return self._verdict
        await self.add_received_header()
        outcome = await self.run_hook("data_post")
        decided = reply_for("data_post", outcome)
        if decided is not None:
            self.log_transaction("rejected", decided[0], plugin=outcome.plugin, hook="data_post")
            return decided
        return await self.queue_message()

    def refuse_message_text(self, end: MessageEnd) -> Reply | None:
        """The core's findings about the text itself: size, line length, bare CR/LF."""
        if end.oversized:
            return Reply(552, "5.3.4 Message too big")
        if end.long_line:
            return Reply(500, "5.5.2 Message has a line longer than 1000 octets")
        if end.bare_lf or end.bare_cr:
            if self.session.limits.normalize_newlines:
                # bare_newline normalize: the core already stored them as CRLF.
                self.transaction.notes["bare_newline"] = "normalized"
                return None
            return Reply(554, "5.5.2 Message contains a bare CR or LF; lines must end with CRLF")
        return None

    async def add_received_header(self) -> None:
        """Prepend our Received field (a received_line plugin may supply the text)."""
        txn = self.transaction
        assert txn.header is not None
        outcome = await self.run_hook("received_line")
        if outcome.result is OK and outcome.message:
            value = outcome.message
        else:
            value = received_value(
                self.connection, txn, self.me, SOFTWARE, with_word=self.received_with()
            )
        txn.header.add("Received", value, index=0)

    async def queue_message(self) -> HandlerResult:
        """queue_pre, queue and queue_post: 250 only when a queue plugin said OK."""
        outcome = await self.run_hook("queue_pre")
        decided = reply_for("queue_pre", outcome)
        stage = "queue_pre"
        if decided is None:
            stage = "queue"
            outcome = await self.run_hook("queue")
            decided = reply_for("queue", outcome) or (
                Reply(250, outcome.message or f"Queued as {self.transaction.id}", "2.0.0"),
                False,
            )
        reply = decided[0]
        self.log_transaction(
            "accepted" if reply.code < 300 else "rejected", reply, plugin=outcome.plugin, hook=stage
        )
        if self.runner.has("queue_post"):
            await self.runner.run_all("queue_post", self.transaction, trace=self.trace)
        return decided

    # -- small commands -------------------------------------------------------------------
    async def smtp_RSET(self, arg: str) -> HandlerResult:
        await self.reset_transaction()
        return _OK

    async def smtp_NOOP(self, arg: str) -> HandlerResult:
        outcome = await self.run_hook("noop", arg)
        return reply_for("noop", outcome) or _OK

    async def smtp_VRFY(self, arg: str) -> HandlerResult:
        outcome = await self.run_hook("vrfy", arg)
        return reply_for("vrfy", outcome) or Reply(250, "2.1.5 User OK")

    async def smtp_HELP(self, arg: str) -> HandlerResult:
        outcome = await self.run_hook("help", arg)
        decided = reply_for("help", outcome)
        if decided is not None:
            return decided
        return Reply(
            214,
            [
                f"2.0.0 This is {SOFTWARE}",
                "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP",
            ],
        )

    async def smtp_QUIT(self, arg: str) -> HandlerResult:
        outcome = await self.run_hook("quit")
        decided = reply_for("quit", outcome)
        return (decided[0] if decided else Reply(221, f"2.0.0 {self.me} closing connection")), True


def _handler_table(cls: type) -> dict[str, Callable[..., Coroutine[Any, Any, HandlerResult]]]:
    """Every ``smtp_<VERB>`` of ``cls`` and its bases, by verb: only verbs made of ASCII
    letters can have a handler (the core upper-cases the verb it hands on)."""
    table = {}
    for name in dir(cls):
        verb = name[5:]
        if name.startswith("smtp_") and verb.isascii() and verb.isalpha():
            handler = getattr(cls, name)
            if callable(handler):
                table[verb] = handler
    return table


SMTPCommands._handlers = _handler_table(SMTPCommands)
