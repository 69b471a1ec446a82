"""LMTP (RFC 2033): the same handlers, hooks and plugins, spoken as LMTP.

:class:`LMTPCommands` is an ordinary subclass of :class:`~qpconn.smtp.commands.SMTPCommands`:
the greeting says LMTP, ``LHLO`` takes the place of HELO/EHLO (the core gives those 500;
the ``ehlo`` hook judges LHLO), the Received field says ``with LMTP`` (``UTF8LMTP``,
``LMTPS``, ...), and the end of a message -- the final ``.`` or a ``BDAT ... LAST`` -- is
answered once per accepted recipient, in RCPT order, with what the queue hook decided for
each (:mod:`qpconn.mail.outcomes`). The listener side (``--listen lmtp:...``) is
:mod:`qpconn.server.lmtp`.

A site with its own handler class gets LMTP on top of it the ordinary way:
``class MyLMTP(LMTPCommands, MyCommands)``, given as ``SMTPFactory(lmtp_commands=MyLMTP)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qpconn.core.events import AuthResponse, ChunkEnd, Command, MessageEnd
from qpconn.core.reply import Reply
from qpconn.mail.outcomes import recipient_replies
from qpconn.smtp.commands import SOFTWARE, SMTPCommands
from qpconn.smtp.context import HandlerResult

if TYPE_CHECKING:
    from qpconn.core.session import ServerSession
    from qpconn.log.level import LevelLogger
    from qpconn.mail.connection import Connection
    from qpconn.smtp.context import ServerSettings

__all__ = ["LMTPCommands"]


class LMTPCommands(SMTPCommands):
    """The handlers of one LMTP session; see the module docstring."""

    lmtp_mode = True

    def __init__(
        self,
        factory: ServerSettings,
        session: ServerSession,
        connection: Connection,
        log: LevelLogger,
    ) -> None:
        super().__init__(factory, session, connection, log)
        # Made before anything is read: every command line meets the LMTP rules.
        session.own_limits().lmtp = True
        connection.notes["lmtp"] = True  # plugins may tell (queue/lmtp does)

    def greeting(self) -> str:
        text = self.config.get("smtpgreeting")
        if text:
            return text if "LMTP" in text.split() else f"{text} LMTP"
        return f"{self.me} LMTP {SOFTWARE} ready"

    async def dispatch(
        self, event: Command | MessageEnd | ChunkEnd | AuthResponse
    ) -> HandlerResult:
        """At the end of a message, one reply per accepted recipient (RFC 2033 §4.2).

        All but the last go out as intermediate replies here; the last is this command's
        reply, and the session core's state follows it as for SMTP.
        """
        ends_message = isinstance(event, MessageEnd) or (
            isinstance(event, ChunkEnd) and event.last
        )
        txn = self.transaction  # message_end replaces it with a fresh one
        result: HandlerResult = await super().dispatch(event)
        if not ends_message or result is None or self.session.pending is None:
            return result
        reply, close = (result, False) if isinstance(result, Reply) else result
        replies = recipient_replies(txn, reply)
        if not replies:
            return result
        for each in replies[:-1]:
            self.session.send_intermediate(each)
        return replies[-1], close
