"""qpconn in LMTP mode as Postfix's final delivery agent (RFC 2033), with a real Postfix.

A private Postfix instance (Debian's package; its own config, queue and log under a
temporary directory) takes mail over SMTP on a free loopback port and delivers it with
its ``lmtp`` client to qpconn's LMTP listener. The queue hook decides per recipient: the
delivered one is stored, the one over quota gets ``552`` in its own LMTP reply, and
Postfix (not qpconn) turns that into a bounce to the sender, which it delivers over LMTP
to qpconn as well. Skips without the package, root, or the ``postfix`` user.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from qpconn.hooks.results import OK
from qpconn.mail.outcomes import set_recipient_reply
from qpconn.plugins import Plugin
from qpconn.server.lmtp import LMTPListenerFactory
from tests.e2e_client import Client
from tests.support.postfix import private_postfix
from tests.support.postfix import read as _read
from tests.support.process import free_port
from tests.support.server import in_thread
from tests.support.timing import wait_until

MASTER_CF = """\
lmtp      unix  - - n - - lmtp
"""

MAIN_CF = """\
relayhost =
relay_transport = lmtp:inet:127.0.0.1:{lmtp}
default_transport = lmtp:inet:127.0.0.1:{lmtp}
"""


class Mailboxes(Plugin):
    """The final store: ``full@`` is over quota, every other recipient gets the message."""

    def register(self) -> None:
        self.delivered: list[tuple[str, str, bytes]] = []

    def hook_queue(self, transaction: Any) -> Any:
        sender = transaction.sender.format() if transaction.sender else "?"
        for rcpt in transaction.recipients:
            if rcpt.user == "full":
                set_recipient_reply(transaction, rcpt, "552 5.2.2 Mailbox full")
            else:
                self.delivered.append((sender, rcpt.address, transaction.body_bytes()))
        return OK, f"2.0.0 Delivered {transaction.id}"


@pytest.fixture
def postfix_in_front() -> Iterator[tuple[int, int, str]]:
    """(Postfix's SMTP port, the port it delivers to over LMTP, Postfix's log path)."""
    lmtp_port = free_port()
    with private_postfix(MAIN_CF, MASTER_CF, lmtp=lmtp_port) as instance:
        yield instance.port, lmtp_port, instance.maillog


def send(port: int) -> tuple[int, str]:
    with Client(("127.0.0.1", port), timeout=30) as client:
        assert client.cmd("EHLO client.test").code == 250
        text = b"Subject: via postfix\r\nMessage-ID: <lm1@client.test>\r\n\r\nhello"
        reply = client.transaction("<a@example.org>", ["<one@mx.test>", "<full@mx.test>"], text)
        client.cmd("QUIT")
    return reply.code, reply.text


@pytest_twisted.ensureDeferred
async def test_postfix_delivers_over_lmtp_and_bounces_the_refused_recipient(
    qpconn_server, postfix_in_front
):
    smtp_port, lmtp_port, maillog = postfix_in_front
    server = qpconn_server(
        plugins=[Mailboxes, "rcpt_ok"], files={"rcpthosts": ["mx.test", "example.org"]}
    )
    listener = reactor.listenTCP(lmtp_port, LMTPListenerFactory(server.factory),
                                 interface="127.0.0.1")  # fmt: skip
    try:
        code, text = await in_thread(send, smtp_port)
        assert code == 250, text
        store = server.factory.plugins[0]
        # The message for one@, then Postfix's bounce for full@ to the sender.
        arrived = await in_thread(wait_until, lambda: len(store.delivered) == 2, 30)
        assert arrived, (store.delivered, _read(maillog))
    finally:
        await listener.stopListening()
    (sender, rcpt, body), (bounce_sender, bounce_rcpt, bounce) = store.delivered
    assert (sender, rcpt) == ("<a@example.org>", "one@mx.test")
    assert body == b"hello\r\n"
    assert (bounce_sender, bounce_rcpt) == ("<>", "a@example.org")
    assert b"full@mx.test" in bounce and b"5.2.2" in bounce
    log = _read(maillog)
    assert "to=<one@mx.test>" in log and "status=sent" in log, log
    assert "to=<full@mx.test>" in log and "status=bounced" in log, log
