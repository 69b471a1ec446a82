"""End-to-end: LMTP (RFC 2033 §4.2) answers the end of a message once per *accepted*
recipient, in RCPT order; a recipient refused at RCPT gets no second reply, also when
the whole transaction is pipelined in one write, and the session stays in step after.
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from qpconn.hooks.results import OK
from qpconn.mail.outcomes import set_recipient_reply
from qpconn.plugins import Plugin
from qpconn.server.lmtp import LMTPListenerFactory
from tests.e2e_client import watch_errors
from tests.support.server import in_thread

MESSAGE = b"Subject: lmtp\r\n\r\nhello\r\n"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


class Store(Plugin):
    """A mailbox store: ``full@`` is over quota, everyone else gets the message."""

    def register(self) -> None:
        self.delivered: list[str] = []

    def hook_queue(self, transaction: Any) -> Any:
        for rcpt in transaction.recipients:
            if rcpt.user == "full":
                set_recipient_reply(transaction, rcpt, "552 5.2.2 Mailbox full")
            else:
                self.delivered.append(rcpt.address)
        return OK, "2.0.0 Delivered"


async def lmtp_server(qpconn_server: Any) -> tuple[Any, Any, tuple[str, int]]:
    # rcpt_ok accepts mx.test only: elsewhere.test is refused at RCPT
    server = qpconn_server(plugins=[Store, "rcpt_ok"])
    port = reactor.listenTCP(0, LMTPListenerFactory(server.factory), interface="127.0.0.1")
    return server, port, ("127.0.0.1", port.getHost().port)


@pytest_twisted.ensureDeferred
async def test_refused_recipients_get_no_reply_after_the_data(qpconn_server):
    server, port, address = await lmtp_server(qpconn_server)

    def client() -> tuple[list[int], list[tuple[int, bytes]], Any]:
        with smtplib.LMTP("127.0.0.1", address[1], timeout=5) as lmtp:
            lmtp.ehlo("client.test")
            lmtp.mail("a@example.org")
            codes = [lmtp.rcpt(r)[0] for r in ("one@mx.test", "x@elsewhere.test", "full@mx.test")]
            first = lmtp.data(MESSAGE)
            # One more reply (full@), none for the refused one: NOOP's must come next.
            return codes, [first, lmtp.getreply()], lmtp.noop()

    try:
        codes, replies, noop = await in_thread(client)
    finally:
        await port.stopListening()
    assert codes[0] == 250 and codes[1] >= 500 and codes[2] == 250
    assert replies == [(250, b"2.0.0 Delivered"), (552, b"5.2.2 Mailbox full")]
    assert noop[0] == 250
    assert server.factory.plugins[0].delivered == ["one@mx.test"]


@pytest_twisted.ensureDeferred
async def test_a_pipelined_lmtp_transaction_gets_exactly_its_replies(qpconn_server):
    server, port, address = await lmtp_server(qpconn_server)
    script = (
        b"LHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<full@mx.test>\r\n"
        b"RCPT TO:<x@elsewhere.test>\r\nRCPT TO:<two@mx.test>\r\nDATA\r\n"
        + MESSAGE
        + b".\r\nNOOP\r\n"
    )

    def finals(data: bytes) -> list[bytes]:
        return [line for line in data.split(b"\r\n") if line[3:4] == b" "]

    def client() -> list[bytes]:
        with socket.create_connection(address, timeout=10) as sock:
            data = b""
            while not finals(data):  # the greeting (bounded by the socket timeout)
                data += sock.recv(4096)
            sock.sendall(script)
            data = b""
            # LHLO, MAIL, 3 RCPT, DATA, 2 per-recipient replies, NOOP: 9 final lines
            while len(finals(data)) < 9:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            sock.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                data += sock.recv(65536)  # anything more would be a reply too many
        return finals(data)

    try:
        finals = await in_thread(client)
    finally:
        await port.stopListening()
    codes = [line[:3] for line in finals]
    # LHLO, MAIL, 3x RCPT, DATA, then full@ and two@ in RCPT order, then NOOP.
    assert codes[:5] == [b"250", b"250", b"250", codes[3], b"250"] and codes[3][:1] == b"5"
    assert codes[5:] == [b"354", b"552", b"250", b"250"], finals
    assert server.factory.plugins[0].delivered == ["two@mx.test"]
