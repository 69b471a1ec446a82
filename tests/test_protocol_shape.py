"""The Twisted protocol owns its parts: handlers, guard and TLS are objects it holds.

These pin the shape that issue "One step in the house" set: at most two qpconn classes in
the protocol's MRO, LMTP as an ordinary subclass of the handlers (no class built at run
time), and a clear error for code that still overrides handlers on the protocol.
"""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted

from qpconn.core.reply import Reply
from qpconn.server.factory import SMTPFactory
from qpconn.server.guard import SessionGuard
from qpconn.server.lmtp import LMTPListenerFactory
from qpconn.server.protocol import SMTPServerProtocol
from qpconn.server.tls import TLSLayer
from qpconn.smtp.commands import SMTPCommands
from qpconn.smtp.lmtp import LMTPCommands
from tests.support.server import in_thread


def qpconn_classes(cls: type) -> list[type]:
    return [klass for klass in cls.__mro__ if klass.__module__.startswith("qpconn.")]


def test_protocol_mro_holds_one_qpconn_class():
    assert qpconn_classes(SMTPServerProtocol) == [SMTPServerProtocol]


def test_lmtp_handlers_are_an_ordinary_subclass():
    assert issubclass(LMTPCommands, SMTPCommands)
    assert LMTPCommands.__module__ == "qpconn.smtp.lmtp"


def test_lmtp_listener_builds_the_factorys_protocol_with_lmtp_handlers():
    factory = SMTPFactory()
    protocol = LMTPListenerFactory(factory).buildProtocol(None)
    assert type(protocol) is SMTPServerProtocol
    assert protocol.commands_class is LMTPCommands


def test_protocol_subclass_overriding_a_handler_is_refused_with_guidance():
    with pytest.raises(TypeError) as caught:

        class OldStyle(SMTPServerProtocol):
            def greeting(self) -> str:
                return "hi"

            async def smtp_XSTATS(self, arg: str) -> Reply:
                return Reply(250, "ok")

    message = str(caught.value)
    assert "greeting, smtp_XSTATS" in message and "SMTPFactory(commands=...)" in message


def test_protocol_subclass_changing_only_the_adapter_is_fine():
    class Quieter(SMTPServerProtocol):
        def timeoutConnection(self) -> None:
            super().timeoutConnection()

    assert qpconn_classes(Quieter) == [SMTPServerProtocol]


@pytest_twisted.ensureDeferred
async def test_each_session_owns_its_handlers_guard_and_tls_layer(qpconn_server):
    server = qpconn_server()

    def client() -> tuple[int, int]:
        with smtplib.SMTP(*server.address) as first, smtplib.SMTP(*server.address) as second:
            return first.noop()[0], second.noop()[0]

    seen: list[SMTPServerProtocol] = []
    original = server.factory.session_started

    def remember(session: SMTPServerProtocol) -> None:
        seen.append(session)
        original(session)

    server.factory.session_started = remember  # type: ignore[method-assign]
    assert await in_thread(client) == (250, 250)
    first, second = seen
    for session in seen:
        assert type(session.commands) is SMTPCommands
        assert isinstance(session.guard, SessionGuard) and isinstance(session.tls, TLSLayer)
        assert session.commands.session is session.session
    assert first.commands is not second.commands
    assert first.commands.connection is not second.commands.connection
