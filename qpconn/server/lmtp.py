"""LMTP server mode (RFC 2033): the same sessions, hooks and plugins, spoken as LMTP.

A listener given as ``lmtp:ENDPOINT`` (``--listen lmtp:tcp:2424`` or ``--lmtp tcp:2424``)
builds its sessions with :func:`lmtp_protocol`: the greeting says LMTP, ``LHLO`` takes
the place of HELO/EHLO (which get 500; the ``ehlo`` hook judges LHLO), the Received
field says ``with LMTP`` (``UTF8LMTP``, ``LMTPS``, ...), and the end of a message -- the
final ``.`` or a ``BDAT ... LAST`` -- is answered once per accepted recipient, in RCPT
order, with what the queue hook decided for each (:mod:`qpconn.mail.outcomes`). So qpconn can
sit behind Postfix as a content filter or a final delivery agent.

Every listener shares one :class:`~qpconn.server.factory.SMTPFactory` (its plugins,
limits and connection counts); only the protocol class differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, ServerFactory

from qpconn.core.events import AuthResponse, ChunkEnd, Command, MessageEnd
from qpconn.core.reply import Reply
from qpconn.mail.outcomes import recipient_replies
from qpconn.smtp.commands import SOFTWARE, HandlerResult

if TYPE_CHECKING:
    from qpconn.server.factory import SMTPFactory
    from qpconn.server.protocol import SMTPServerProtocol

__all__ = ["LMTPSession", "LMTPListenerFactory", "lmtp_protocol", "LMTP_PREFIX"]

#: the listen-string prefix that makes a listener speak LMTP
LMTP_PREFIX = "lmtp:"


class LMTPSession:
    """Mixed in before an SMTPServerProtocol class; see the module docstring."""

    lmtp_mode = True
    _lmtp_replies: list[Reply] | None = None

    if TYPE_CHECKING:  # provided by SMTPServerProtocol
        session: Any
        connection: Any
        me: str
        config: Any
        transaction: Any

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[misc]
        # Nothing is read before this returns: every command line meets the LMTP rules.
        self.session.limits.lmtp = True
        self.connection.notes["lmtp"] = True  # plugins may tell (queue/lmtp does)

    def greeting(self) -> str:
        text = self.config.get("smtpgreeting")
        if text:
            return text if "LMTP" in text.split() else f"{text} LMTP"
        return f"{self.me} LMTP {SOFTWARE} ready"

    async def dispatch(self, event: Command | MessageEnd | AuthResponse) -> HandlerResult:
        """The end of a message: remember one reply per recipient for ``_answer``."""
        ends_message = isinstance(event, MessageEnd) or (
            isinstance(event, ChunkEnd) and event.last
        )
        txn = self.transaction  # message_end replaces it with a fresh one
        result: HandlerResult = await super().dispatch(event)  # type: ignore[misc]
        if ends_message and result is not None:
            overall = result if isinstance(result, Reply) else result[0]
            self._lmtp_replies = recipient_replies(txn, overall) or None
        return result

    def _answer(self, result: HandlerResult) -> None:
        replies, self._lmtp_replies = self._lmtp_replies, None
        pending = self.session.pending
        if replies and isinstance(pending, MessageEnd | ChunkEnd):
            close = isinstance(result, tuple) and result[1]
            for reply in replies[:-1]:
                self.session.send_intermediate(reply)
            result = (replies[-1], close)
        super()._answer(result)  # type: ignore[misc]


_CLASSES: dict[type, type] = {}


def lmtp_protocol(base: type[SMTPServerProtocol]) -> type[SMTPServerProtocol]:
    """``base`` (the factory's protocol class, maybe a subclass) speaking LMTP."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"LMTP{base.__name__}", (LMTPSession, base), {})
        _CLASSES[base] = cls
    return cls


class LMTPListenerFactory(ServerFactory):
    """Builds LMTP sessions of a shared SMTPFactory, for one listener."""

    def __init__(self, factory: SMTPFactory) -> None:
        self.smtp_factory = factory

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        protocol = lmtp_protocol(self.smtp_factory.protocol)()
        protocol.factory = self.smtp_factory
        return protocol
