"""End-to-end: the size and time limits, and that a session outlives hitting one.

Command lines over 512 octets, a megabyte without a newline, text lines over 1000 octets,
messages over ``databytes`` (announced with SIZE or not), spooling past
``size_threshold``, and the idle ``timeout`` (which is the client's time, not ours).
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from qpconn.hooks.results import OK
from qpconn.plugins import Plugin
from tests.e2e_client import Client, ehlo, maildir_line, plugin_of, split_message, watch_errors
from tests.support.server import in_thread
from tests.support.timing import assert_within_timeout, wait_until

RCPT = "<user@mx.test>"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    """Errors the server logs; a test fails on one it does not expect (and clear)."""
    yield from watch_errors()


@pytest_twisted.ensureDeferred
async def test_command_line_over_512_octets_gets_500_and_session_stays_in_step(server):
    def client():
        with ehlo(server) as smtp:
            long_noop = smtp.cmd("NOOP " + "x" * 600)
            # 512 octets with CRLF is the limit itself, and still fine.
            at_limit = smtp.cmd("NOOP " + "y" * (512 - 7))
            return long_noop, at_limit, smtp.code("MAIL FROM:<a@example.org>")

    long_noop, at_limit, mail = await in_thread(client)
    assert (long_noop.code, long_noop.last) == (500, "5.5.2 Line too long")
    assert at_limit.code == 250
    assert mail == 250


@pytest_twisted.ensureDeferred
async def test_megabyte_without_newline_gets_one_500_then_session_works(server):
    def client():
        with ehlo(server) as smtp:
            smtp.send(b"NOOP " + b"z" * (1 << 20))
            smtp.send(b"\r\nNOOP\r\n")
            replies = []
            for _ in range(10):
                replies.append(smtp.reply())
                if replies[-1].code != 500:
                    break
            return replies

    replies = await in_thread(client)
    assert [r.code for r in replies] == [500, 250]


@pytest_twisted.ensureDeferred
async def test_text_line_over_1000_octets_is_refused_at_end_of_data(server):
    def client():
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.cmd(f"RCPT TO:{RCPT}")
            smtp.cmd("DATA")
            return smtp.message(b"s: x\r\n\r\n" + b"a" * 1001 + b"\r\nend"), smtp.code("NOOP")

    refused, noop = await in_thread(client)
    assert refused.code >= 500 and refused.code < 600
    assert refused.last.startswith("5.")
    assert noop == 250
    assert server.messages() == []


@pytest_twisted.ensureDeferred
async def test_two_megabyte_text_line_is_refused_and_the_end_marker_still_found(server):
    def client():
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.cmd(f"RCPT TO:{RCPT}")
            smtp.cmd("DATA")
            smtp.send(b"s: x\r\n\r\n")
            for _ in range(32):
                smtp.send(b"b" * 65536)
            return smtp.message(b"\r\nshort line"), smtp.code("NOOP")

    refused, noop = await in_thread(client)
    assert (refused.code, refused.last.split()[0]) == (500, "5.5.2")
    assert noop == 250
    assert server.messages() == []


@pytest_twisted.ensureDeferred
async def test_mail_with_size_over_databytes_gets_552_and_within_it_250(qpconn_server):
    server = qpconn_server(files={"databytes": "5000"})

    def client():
        with ehlo(server) as smtp:
            too_big = smtp.cmd("MAIL FROM:<a@example.org> SIZE=5001")
            return too_big, smtp.code("MAIL FROM:<a@example.org> SIZE=5000")

    too_big, fits = await in_thread(client)
    assert (too_big.code, too_big.last.split()[0]) == (552, "5.3.4")
    assert fits == 250


@pytest_twisted.ensureDeferred
async def test_message_over_databytes_is_read_to_its_end_refused_and_next_one_works(
    qpconn_server,
):
    server = qpconn_server(files={"databytes": "2000"})

    def client():
        with ehlo(server) as smtp:
            big = b"s: big\r\n\r\n" + b"line of text\r\n" * 400
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.cmd(f"RCPT TO:{RCPT}")
            smtp.cmd("DATA")
            refused = smtp.message(big)
            small = smtp.transaction("<a@example.org>", [RCPT], b"s: small\r\n\r\nsmall")
            return refused, small

    refused, small = await in_thread(client)
    assert (refused.code, refused.last.split()[0]) == (552, "5.3.4")
    assert small.code == 250
    (message,) = server.messages()
    assert message.endswith(b"\n\nsmall\n")


@pytest_twisted.ensureDeferred
async def test_message_larger_than_size_threshold_is_spooled_and_stored_whole(qpconn_server):
    server = qpconn_server(files={"size_threshold": "4096"})
    body = b"".join(b"%06d the quick brown fox\r\n" % n for n in range(20000))

    def client():
        with smtplib.SMTP(*server.address, timeout=5) as smtp:
            smtp.ehlo("client.test")
            return smtp.sendmail("a@example.org", ["user@mx.test"], b"Subject: big\r\n\r\n" + body)

    assert await in_thread(client) == {}
    (message,) = server.messages()
    assert split_message(message)[1] == body.replace(b"\r\n", b"\n")  # stored with LF


@pytest_twisted.ensureDeferred
async def test_idle_client_gets_421_and_is_disconnected(qpconn_server):
    server = qpconn_server(files={"timeout": "0.3"})

    def client():
        with Client(server.address) as smtp:
            smtp.cmd("EHLO client.test")
            started = time.monotonic()
            reply = smtp.reply()
            return reply, time.monotonic() - started, smtp.is_closed()

    reply, waited, closed = await in_thread(client)
    assert (reply.code, reply.last.split()[0]) == (421, "4.4.2")
    assert_within_timeout(waited, fired=0.3, instead_of=300)  # ours, not the default
    assert closed


class SlowMail(Plugin):
    """mail: accepts after 0.5 s, longer than the test's idle timeout."""

    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        return task.deferLater(reactor, 0.5, lambda: OK)


class SlowQueuePre(Plugin):
    """queue_pre: decides nothing, after 0.5 s (as a slow content scanner would)."""

    def hook_queue_pre(self, transaction: Any) -> Any:
        return task.deferLater(reactor, 0.5, lambda: None)


@pytest_twisted.ensureDeferred
async def test_time_a_hook_takes_does_not_count_as_client_idle_time(qpconn_server):
    server = qpconn_server(files={"timeout": "0.3"}, plugins=[SlowMail])

    def client():
        with ehlo(server) as smtp:
            return smtp.cmd("MAIL FROM:<a@example.org>"), smtp.code("NOOP")

    mail, noop = await in_thread(client)
    assert mail.code == 250
    assert noop == 250


class AbortingQueuePre(Plugin):
    """queue_pre: the connection dies (aborted) while this hook is still working."""

    sessions: Any = ()

    def hook_queue_pre(self, transaction: Any) -> Any:
        for session in list(self.sessions):
            reactor.callLater(0.1, session.transport.abortConnection)
        return task.deferLater(reactor, 0.5, lambda: None)


@pytest_twisted.ensureDeferred
async def test_connection_lost_while_the_message_is_queued_never_stores_it_truncated(
    qpconn_server, tmp_path
):
    # The connection is lost while queue_pre is still working: cleanup (disconnect hooks,
    # closing the transaction) must wait for the queue hook, which stores the whole message.
    plugins = ["rcpt_ok", AbortingQueuePre, maildir_line(tmp_path / "maildir")]
    server = qpconn_server(plugins=plugins)
    plugin_of(server, AbortingQueuePre).sessions = server.factory.sessions

    def client():
        with ehlo(server) as smtp:
            assert smtp.code("MAIL FROM:<a@example.org>") == 250
            assert smtp.code(f"RCPT TO:{RCPT}") == 250
            assert smtp.code("DATA") == 354
            smtp.send(b"s: x\r\n\r\nthe body\r\n.\r\n")

    await in_thread(client)
    # The session ends only once the queue hook has finished (what this test pins).
    assert await in_thread(wait_until, lambda: not server.factory.sessions)
    stored = server.messages()
    assert [split_message(m)[1] for m in stored] == [b"the body\n"]


@pytest_twisted.ensureDeferred
async def test_client_that_half_closes_after_its_commands_still_gets_every_reply(server):
    import socket

    def client():
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(
                b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\n"
                b"DATA\r\nSubject: x\r\n\r\nhalf\r\n.\r\n"
            )
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    data = await in_thread(client)
    assert [line[:3] for line in data.split(b"\r\n") if line[3:4] == b" "] == [
        b"220", b"250", b"250", b"250", b"354", b"250"
    ]
    assert len(server.messages()) == 1
