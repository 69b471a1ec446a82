"""One milter for one SMTP session: its state from connect to quit, and what each answer
means for the hook that asked.

A milter's decision binds more than the step it answers (Sendmail's rules, which Postfix
follows and so do we):

* ``accept`` at connect or HELO: nothing more is asked of it for the whole session (it is
  sent QUIT and closed); later, nothing more for this message;
* ``reject``, ``tempfail`` or a reply code at connect or HELO: that refusal answers every
  later command of the session too; later, it refuses the step it answers (a refused RCPT
  refuses that recipient only);
* ``discard``: the message is accepted and dropped; nothing more is asked about it;
* ``shutdown`` (SMFIR_SHUTDOWN, or SMFIR_CONN_FAIL): 421 and the session closes.

When the milter cannot be used (it is down, it hangs past a timeout, it breaks the
protocol or hangs up), ``default_action`` decides, for the rest of the session, as
Postfix's ``milter_default_action`` does: ``tempfail`` refuses every later command with
``451 4.7.1 Service unavailable - try again later`` (at connect: the connection), and
``accept`` goes on as if this milter were not configured.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from qpconn.hooks.results import DECLINED, DENY, DENYSOFT, DENYSOFT_DISCONNECT, Result
from qpconn.milter import codec
from qpconn.milter.client import MilterClient, MilterError, Timeouts, open_milter
from qpconn.milter.codec import MilterProtocolError, Steps
from qpconn.milter.edits import apply_edits, header_value_for_milter
from qpconn.milter.session import Answer

__all__ = ["MilterLink", "Verdict", "UNAVAILABLE"]

UNAVAILABLE = "4.7.1 Service unavailable - try again later"
_REJECTED = "5.7.1 Command rejected"
_CLOSING = "4.7.0 Server closing connection"
_SESSION_STEPS = (codec.Connect, codec.Helo)


@dataclass(frozen=True)
class Verdict:
    """What one milter decided, as a hook result: ``name`` is the milter's word for it
    (``accept``, ``reject``, ``tempfail``, ``discard``, ``shutdown``, ``error``), for the
    log, the verdict notes and the metrics; ``detail`` says why, for an ``error``."""

    result: Result
    message: str | list[str] | None
    name: str
    detail: str = ""
    edits: tuple[str, ...] = ()
    quarantine: str | None = None


class MilterLink:
    """The connection to one milter for one SMTP session (milters are per connection:
    libmilter keeps one context per MTA connection, so each session opens its own)."""

    def __init__(self, reactor: Any, address: str, timeouts: Timeouts, default_action: str) -> None:
        self.reactor = reactor
        self.address = address
        self.timeouts = timeouts
        self.default_action = default_action
        self.client: MilterClient | None = None
        #: a refusal that answers every later command (connect/HELO reject, failure)
        self.refusal: Verdict | None = None
        #: nothing more is sent for the session (accepted, or failed under accept)
        self.finished = False
        #: nothing more is sent for this message (accepted or discarded)
        self.message_finished = False
        #: MAIL was sent and no ABORT since: the milter holds a transaction open
        self.in_message = False

    @property
    def active(self) -> bool:
        return self.refusal is None and not self.finished and self.client is not None

    async def open(self) -> Verdict | None:
        try:
            self.client = await open_milter(self.reactor, self.address, self.timeouts)
        except MilterError as error:
            return self.failed(error)
        return None

    def failed(self, error: MilterError) -> Verdict:
        """Apply ``default_action`` after ``error``; the verdict the hook gives now."""
        if self.client is not None:
            self.client.abort()
        self.client = None
        if self.default_action == "accept":
            self.finished = True
            return Verdict(DECLINED, None, "error", str(error))
        self.refusal = Verdict(DENYSOFT, UNAVAILABLE, "error", str(error))
        return self.refusal

    async def ask(
        self, message: codec.Message, macros: Mapping[str, str | None], *, content: bool = False
    ) -> Verdict | None:
        """Send one step; the verdict that decides the hook, or None to go on."""
        if self.refusal is not None:
            return self.refusal
        if not self.active or (self.message_finished and not _is_session_step(message)):
            return None
        assert self.client is not None
        try:
            answer = await self.client.step(message, macros, content=content)
        except MilterError as error:
            return self.failed(error)
        if answer is None:
            return None
        return self._decide(type(message), answer)

    async def message(
        self, transaction: Any, body: AsyncIterator[bytes], macros: Mapping[str, str | None]
    ) -> Verdict | None:
        """The header, end of header, body and end of message; the changes asked for are
        applied to ``transaction`` before this returns."""
        if self.refusal is not None:
            return self.refusal
        if not self.active or self.message_finished:
            return None
        assert self.client is not None
        session = self.client.session
        leading = bool(session.steps & Steps.HEADER_LEADING_SPACE)
        if session.wants(codec.HeaderField):
            for name, raw in transaction.header.raw_items():
                field = codec.HeaderField(name, header_value_for_milter(raw, leading))
                verdict = await self.ask(field, macros, content=True)
                if verdict is not None or not self.active:
                    return verdict
        verdict = await self.ask(codec.EndOfHeaders(), macros, content=True)
        if verdict is not None or not self.active:
            return verdict
        if session.wants(codec.BodyChunk):
            async for chunk in body:
                verdict = await self.ask(codec.BodyChunk(chunk), macros, content=True)
                if verdict is not None or not self.active:
                    return verdict
                if not session.wants(codec.BodyChunk):
                    break  # SMFIR_SKIP
        try:
            answer = await self.client.step(codec.EndOfMessage(), macros, content=True)
        except MilterError as error:
            return self.failed(error)
        assert answer is not None  # the end of the message is always answered
        try:
            done = apply_edits(transaction, answer.edits, leading)
        except MilterProtocolError as exc:
            return self.failed(MilterError("protocol", str(exc)))
        verdict = self._decide(codec.EndOfMessage, answer)
        self.message_finished = True
        name = verdict.name if verdict is not None else "continue"
        return Verdict(
            verdict.result if verdict is not None else DECLINED,
            verdict.message if verdict is not None else None,
            name, edits=tuple(done), quarantine=answer.quarantine,
        )  # fmt: skip

    def abort(self) -> None:
        """The transaction ended (RSET, a new HELO, the end of DATA): SMFIC_ABORT."""
        if self.in_message and self.active:
            assert self.client is not None
            self.client.notify(codec.Abort())
        self.in_message = False
        self.message_finished = False

    def quit(self) -> None:
        """The session is over: SMFIC_QUIT, then close."""
        if self.client is not None:
            if self.active:
                self.client.notify(codec.Quit())
            self.client.close()
            self.client = None

    def _decide(self, step: type[codec.Message], answer: Answer) -> Verdict | None:
        decision = answer.decision
        whole_session = step in _SESSION_STEPS
        if isinstance(decision, codec.Continue):
            return None
        if isinstance(decision, codec.Accept):
            if whole_session:
                self.quit()
                self.finished = True
            else:
                self.message_finished = True
            return Verdict(DECLINED, None, "accept")
        if isinstance(decision, codec.Discard):
            self.message_finished = True
            return Verdict(DECLINED, None, "discard")
        if isinstance(decision, (codec.Shutdown, codec.ConnectionFailure)):
            verdict = Verdict(DENYSOFT_DISCONNECT, _CLOSING, "shutdown")
        elif isinstance(decision, codec.ReplyCode):
            temporary = decision.text.startswith("4")
            lines = decision.lines
            verdict = Verdict(DENYSOFT if temporary else DENY, lines[0] if len(lines) == 1
                              else lines, "tempfail" if temporary else "reject")  # fmt: skip
        elif isinstance(decision, codec.Tempfail):
            verdict = Verdict(DENYSOFT, UNAVAILABLE, "tempfail")
        else:
            verdict = Verdict(DENY, _REJECTED, "reject")
        if whole_session or verdict.result is DENYSOFT_DISCONNECT:
            self.refusal = verdict
            if self.client is not None:
                self.client.close()
                self.client = None
        return verdict


def _is_session_step(message: codec.Message) -> bool:
    return isinstance(message, (codec.Helo, codec.Mail))
