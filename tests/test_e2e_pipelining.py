"""End-to-end: PIPELINING, and sessions that run side by side.

Replies leave in the order the commands came, whether the commands arrive in one write
or a hook answers later; commands after QUIT are not answered; several sessions whose
hooks wait at the same time each get their own replies and their own message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from qpconn.hooks.results import DENY, OK
from qpconn.plugins import Plugin
from tests.e2e_client import Client, ehlo, maildir_line, split_message, watch_errors
from tests.support.server import in_thread

RCPT = "<user@mx.test>"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    """Errors the server logs; a test fails on one it does not expect (and clear)."""
    yield from watch_errors()


@pytest_twisted.ensureDeferred
async def test_pipelined_transaction_in_one_write_gets_replies_in_order(server):
    def client():
        with Client(server.address) as smtp:
            smtp.cmd("EHLO client.test")
            smtp.send(
                b"MAIL FROM:<a@example.org>\r\n"
                b"RCPT TO:<one@mx.test>\r\n"
                b"RCPT TO:<two@mx.test>\r\n"
                b"DATA\r\n"
            )
            first = smtp.replies(4)
            # Text, end marker, next command and QUIT in one write, too.
            smtp.send(b"Subject: p\r\n\r\npiped\r\n.\r\nNOOP\r\nQUIT\r\n")
            rest = smtp.replies(3)
            return first + rest, smtp.is_closed()

    replies, closed = await in_thread(client)
    assert [r.code for r in replies] == [250, 250, 250, 354, 250, 250, 221]
    assert replies[1].last.startswith("2.1.5 <one@mx.test>")
    assert replies[2].last.startswith("2.1.5 <two@mx.test>")
    assert closed
    (message,) = server.messages()
    assert split_message(message)[1] == b"piped\n"


@pytest_twisted.ensureDeferred
async def test_commands_pipelined_after_quit_are_not_answered(server):
    def client():
        with Client(server.address) as smtp:
            smtp.send(b"EHLO client.test\r\nQUIT\r\nNOOP\r\nNOOP\r\n")
            return smtp.replies(2), smtp.is_closed()

    replies, closed = await in_thread(client)
    assert [r.code for r in replies] == [250, 221]
    assert closed


class SlowAndFastRcpt(Plugin):
    """rcpt: slow.test is accepted 0.1 s later (Deferred); fast.test is refused at once."""

    def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> Any:
        if recipient.host == "slow.test":
            return task.deferLater(reactor, 0.1, lambda: OK)
        if recipient.host == "fast.test":
            return DENY, "5.7.1 fast refusal"
        return None


@pytest_twisted.ensureDeferred
async def test_pipelined_replies_stay_in_order_when_a_rcpt_hook_answers_later(
    qpconn_server, tmp_path
):
    server = qpconn_server(plugins=[SlowAndFastRcpt, maildir_line(tmp_path / "maildir")])

    def client():
        with ehlo(server) as smtp:
            smtp.send(
                b"MAIL FROM:<a@example.org>\r\n"
                b"RCPT TO:<one@slow.test>\r\n"
                b"RCPT TO:<two@fast.test>\r\n"
                b"RCPT TO:<three@slow.test>\r\n"
                b"DATA\r\n"
            )
            replies = smtp.replies(5)
            return replies, smtp.message(b"s: x\r\n\r\npiped")

    replies, stored = await in_thread(client)
    assert [r.code for r in replies] == [250, 250, 550, 250, 354]
    assert replies[1].last.startswith("2.1.5 <one@slow.test>")
    assert replies[2].last == "5.7.1 fast refusal"
    assert replies[3].last.startswith("2.1.5 <three@slow.test>")
    assert stored.code == 250
    (message,) = server.messages()
    assert b"Delivered-To: one@slow.test\nDelivered-To: three@slow.test\n" in message


class SlowRcpt(Plugin):
    """rcpt: accepts every recipient 50 ms later, so that sessions overlap in the hook."""

    def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> Any:
        return task.deferLater(reactor, 0.05, lambda: OK)


@pytest_twisted.ensureDeferred
async def test_hundreds_of_pipelined_commands_get_every_reply_in_order(server):
    commands = [b"NOOP", b"RSET", b"VRFY x", b"HELP"] * 100

    def client():
        with ehlo(server) as smtp:
            smtp.send(b"".join(command + b"\r\n" for command in commands))
            return smtp.replies(len(commands)), smtp.code("NOOP")

    replies, noop = await in_thread(client)
    assert [r.code for r in replies] == [250, 250, 252, 214] * 100
    assert noop == 250


@pytest_twisted.ensureDeferred
async def test_concurrent_sessions_with_waiting_hooks_each_store_their_own_message(
    qpconn_server, tmp_path
):
    server = qpconn_server(plugins=[SlowRcpt, maildir_line(tmp_path / "maildir")])

    def client(number: int):
        with ehlo(server) as smtp:
            smtp.send(
                f"MAIL FROM:<s{number}@example.org>\r\n"
                f"RCPT TO:<r{number}@mx.test>\r\n"
                f"RCPT TO:<r{number}b@mx.test>\r\n"
                "DATA\r\n"
            )
            assert [r.code for r in smtp.replies(4)] == [250, 250, 250, 354]
            return smtp.message(f"Subject: {number}\r\n\r\nbody {number}".encode())

    sessions = 6
    replies = await defer.gatherResults([in_thread(client, n) for n in range(sessions)])
    assert [r.code for r in replies] == [250] * sessions
    stored = {}
    for message in server.messages():
        fields, body = split_message(message)
        stored[fields[0]] = (fields[1:3], body)
    assert stored == {
        f"Return-Path: <s{n}@example.org>".encode(): (
            [f"Delivered-To: r{n}@mx.test".encode(), f"Delivered-To: r{n}b@mx.test".encode()],
            f"body {n}\n".encode(),
        )
        for n in range(sessions)
    }
