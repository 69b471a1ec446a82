"""LMTP listeners (RFC 2033): the factory's sessions, with LMTP's command handlers.

A listener given as ``lmtp:ENDPOINT`` (``--listen lmtp:tcp:2424`` or ``--lmtp tcp:2424``)
builds its sessions with :class:`LMTPListenerFactory`: the same protocol class as every
other listener, holding the factory's ``lmtp_commands`` handlers
(:class:`qpconn.smtp.lmtp.LMTPCommands` unless a site gives its own) instead of its SMTP
ones. So qpconn can sit behind Postfix as a content filter or a final delivery agent.

Every listener shares one :class:`~qpconn.server.factory.SMTPFactory` (its plugins,
limits and connection counts); only the handler class differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, ServerFactory

if TYPE_CHECKING:
    from qpconn.server.factory import SMTPFactory

__all__ = ["LMTPListenerFactory", "LMTP_PREFIX"]

#: the listen-string prefix that makes a listener speak LMTP
LMTP_PREFIX = "lmtp:"


class LMTPListenerFactory(ServerFactory):
    """Builds LMTP sessions of a shared SMTPFactory, for one listener."""

    def __init__(self, factory: SMTPFactory) -> None:
        self.smtp_factory = factory

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        factory = self.smtp_factory
        protocol = factory.protocol()
        protocol.factory = factory
        protocol.commands_class = factory.lmtp_commands
        return protocol
