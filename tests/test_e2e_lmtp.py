"""End-to-end: LMTP server mode (RFC 2033) with smtplib.LMTP and raw sockets."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from qpconn.app.options import Options, makeService
from qpconn.hooks.results import DENY, OK
from qpconn.mail.outcomes import set_recipient_reply
from qpconn.plugins import Plugin
from qpconn.server.lmtp import LMTPListenerFactory
from tests.e2e_client import Client, watch_errors
from tests.support.nexthop import Recorder, aiosmtpd_next_hop
from tests.support.server import in_thread

MESSAGE = b"Subject: lmtp\r\n\r\nhello\r\n"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


class Deliver(Plugin):
    """A mailbox store: full@ is over quota, later@ is busy, everyone else gets it."""

    refuse_post = False

    def register(self) -> None:
        self.delivered: list[tuple[str, bytes]] = []

    def hook_data_post(self, transaction: Any) -> Any:
        return (DENY, "5.7.1 content refused") if self.refuse_post else None

    def hook_queue(self, transaction: Any) -> Any:
        for rcpt in transaction.recipients:
            if rcpt.user == "full":
                set_recipient_reply(transaction, rcpt, "552 5.2.2 Mailbox full")
            elif rcpt.user == "later":
                set_recipient_reply(transaction, rcpt.address, "451 4.3.0 Mailbox busy")
            else:
                self.delivered.append((rcpt.address, transaction.body_bytes()))
        return OK, f"2.0.0 Delivered {transaction.id}"


async def lmtp_server(qpconn_server: Any, *plugins: Any) -> tuple[Any, Any, tuple[str, int]]:
    server = qpconn_server(plugins=[*plugins, "rcpt_ok"])
    port = reactor.listenTCP(0, LMTPListenerFactory(server.factory), interface="127.0.0.1")
    return server, port, ("127.0.0.1", port.getHost().port)


@pytest_twisted.ensureDeferred
async def test_one_reply_per_recipient_from_the_queue_hook(qpconn_server):
    server, port, address = await lmtp_server(qpconn_server, Deliver)

    def client():
        with smtplib.LMTP("127.0.0.1", address[1], timeout=5) as lmtp:
            greeting_ok = lmtp.ehlo("client.test")[0] == 250  # sends LHLO
            lmtp.mail("a@example.org")
            for rcpt in ("one@mx.test", "full@mx.test", "later@mx.test"):
                assert lmtp.rcpt(rcpt)[0] == 250
            first = lmtp.data(MESSAGE)
            # smtplib.LMTP reads one reply; the others follow, one per recipient.
            return greeting_ok, [first, lmtp.getreply(), lmtp.getreply()], lmtp.noop()

    try:
        ok, replies, noop = await in_thread(client)
    finally:
        await port.stopListening()
    assert ok
    assert [code for code, _ in replies] == [250, 552, 451]
    assert replies[0][1].startswith(b"2.0.0 Delivered ")
    assert replies[1][1] == b"5.2.2 Mailbox full"
    assert noop[0] == 250
    ((rcpt, body),) = server.factory.plugins[0].delivered
    assert rcpt == "one@mx.test" and body == b"hello\r\n"


@pytest_twisted.ensureDeferred
async def test_lhlo_only_lmtp_greeting_and_received(qpconn_server):
    server, port, address = await lmtp_server(qpconn_server, "queue/maildir maildir")

    def client():
        with Client(address) as lmtp:
            helo, ehlo = lmtp.cmd("HELO c.test"), lmtp.cmd("EHLO c.test")
            lhlo = lmtp.cmd("LHLO c.test")
            reply = lmtp.transaction("<a@example.org>", ["<u@mx.test>"], MESSAGE)
            return lmtp.greeting, helo, ehlo, lhlo, reply

    try:
        greeting, helo, ehlo, lhlo, reply = await in_thread(client)
    finally:
        await port.stopListening()
    assert " LMTP " in greeting.last
    assert (helo.code, ehlo.code) == (500, 500)
    assert lhlo.code == 250 and "CHUNKING" in lhlo.lines
    assert reply.code == 250
    (message,) = server.messages()
    assert b" with LMTP id " in message.replace(b"\r\n\t", b" ")


@pytest_twisted.ensureDeferred
async def test_a_refused_message_is_refused_for_every_recipient(qpconn_server):
    server, port, address = await lmtp_server(qpconn_server, Deliver)
    server.factory.plugins[0].refuse_post = True

    def client():
        with Client(address) as lmtp:
            assert lmtp.code("LHLO c.test") == 250
            assert lmtp.code("MAIL FROM:<a@example.org>") == 250
            assert lmtp.code("RCPT TO:<one@mx.test>") == 250
            assert lmtp.code("RCPT TO:<two@mx.test>") == 250
            # With BDAT: the LAST chunk is answered per recipient too.
            lmtp.send(b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE)
            return lmtp.replies(2), lmtp.code("NOOP")

    try:
        replies, noop = await in_thread(client)
    finally:
        await port.stopListening()
    assert [(r.code, r.last) for r in replies] == [(552, "5.7.1 content refused")] * 2
    assert noop == 250
    assert server.factory.plugins[0].delivered == []


@pytest_twisted.ensureDeferred
async def test_lmtp_in_front_of_an_lmtp_store_passes_each_outcome_on(qpconn_server):
    """qpconn as an LMTP proxy: the store's per-recipient replies reach our client, so a
    temporary failure for one recipient does not make the others get a duplicate."""
    recorder = Recorder(lmtp_replies={"b@mx.test": "452 4.2.2 Over quota"})
    with aiosmtpd_next_hop(recorder, lmtp=True) as (hop, controller):
        _server, port, address = await lmtp_server(
            qpconn_server, f"queue/lmtp 127.0.0.1 {controller.port}"
        )

        def client():
            with Client(address, timeout=15) as lmtp:
                assert lmtp.code("LHLO c.test") == 250
                assert lmtp.code("MAIL FROM:<x@example.org>") == 250
                assert lmtp.code("RCPT TO:<a@mx.test>") == 250
                assert lmtp.code("RCPT TO:<b@mx.test>") == 250
                assert lmtp.code("DATA") == 354
                lmtp.send(MESSAGE + b".\r\n")
                return lmtp.replies(2)

        try:
            first, second = await in_thread(client)
        finally:
            await port.stopListening()
        assert first.code == 250
        assert (second.code, second.last) == (452, "4.2.2 Over quota")
        assert [m.recipients for m in hop.messages] == [["a@mx.test"]]


def test_lmtp_listen_options() -> None:
    options = Options()
    options.parseOptions(
        ["--lmtp", "tcp:0:interface=127.0.0.1", "--listen", "lmtp:unix:lmtp.sock",
         "--listen", "tcp:0:interface=127.0.0.1"]
    )  # fmt: skip
    top = makeService(options)
    listeners = [child.factory for child in top if hasattr(child, "endpoint")]
    kinds = [type(factory).__name__ for factory in listeners]
    assert kinds == ["LMTPListenerFactory", "LMTPListenerFactory", "SMTPFactory"]
    assert all(getattr(f, "smtp_factory", f) is top.factory for f in listeners)
