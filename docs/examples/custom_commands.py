"""An SMTPCommands subclass: a new greeting, a new command, handlers changed (docs/protocol.md).

* ``greeting()`` gives the 220 text (``config/smtpgreeting`` is ignored from here on).
* ``ehlo_lines()`` advertises ``XSTATS`` after the standard extensions.
* ``smtp_XSTATS`` is a new command: the recipients and messages accepted on this
  connection so far.
* ``smtp_RCPT`` and ``message_end`` (the end of DATA) are extended to keep count, and
  ``smtp_QUIT`` to say goodbye with it; the hooks still run, since the originals are
  called.
* ``unrecognized_command`` answers EXPN with 502 and closes the connection on an HTTP
  request line, before the ``unrecognized_command`` hook runs.

Run it with ``twistd -n -y`` and a .tac file that passes ``commands=StatsCommands`` to
:func:`qpconn.app.service.make_service` (see docs/examples/qpconn.tac).
"""

from __future__ import annotations

from qpconn.core.events import MessageEnd
from qpconn.core.reply import Reply
from qpconn.smtp.commands import HandlerResult, SMTPCommands

#: Request methods a web client or an open-proxy scanner starts with.
HTTP_VERBS = frozenset({"GET", "HEAD", "POST", "PUT", "CONNECT", "OPTIONS"})


def code_of(result: HandlerResult) -> int | None:
    """The reply code of what a handler returned: a Reply, (Reply, close) or None."""
    if result is None:
        return None
    return result.code if isinstance(result, Reply) else result[0].code


class StatsCommands(SMTPCommands):
    """One instance per connection, so plain attributes are per-session state."""

    recipients_accepted = 0
    messages_accepted = 0

    def greeting(self) -> str:
        return f"{self.me} ESMTP Example Mail Service; no unsolicited mail"

    def ehlo_lines(self) -> list[str]:
        return [*super().ehlo_lines(), "XSTATS"]

    async def smtp_XSTATS(self, arg: str) -> HandlerResult:
        if arg:
            return Reply(501, "5.5.4 Syntax: XSTATS")
        return Reply(
            250,
            [
                f"2.0.0 session {self.connection.id}",
                f"recipients accepted: {self.recipients_accepted}",
                f"messages accepted: {self.messages_accepted}",
            ],
        )

    async def smtp_RCPT(self, arg: str) -> HandlerResult:
        result = await super().smtp_RCPT(arg)
        if code_of(result) == 250:
            self.recipients_accepted += 1
        return result

    async def message_end(self, end: MessageEnd) -> HandlerResult:
        result = await super().message_end(end)
        if code_of(result) == 250:
            self.messages_accepted += 1
        return result

    async def smtp_QUIT(self, arg: str) -> HandlerResult:
        reply, close = await super().smtp_QUIT(arg)  # type: ignore[misc]
        if reply.code == 221:
            reply = Reply(221, f"2.0.0 {self.messages_accepted} message(s) accepted, bye")
        return reply, close

    async def unrecognized_command(self, verb: str, arg: str) -> HandlerResult:
        if verb == "EXPN":
            return Reply(502, "5.5.1 EXPN is not implemented")
        if verb in HTTP_VERBS:
            # (Reply, True): send this reply, then close the connection.
            return Reply(554, "5.7.0 This is an SMTP server, not a web server"), True
        return await super().unrecognized_command(verb, arg)
