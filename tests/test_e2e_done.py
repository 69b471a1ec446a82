"""End-to-end: DONE, the "I answered this myself" result, at the hooks where it matters.

The rule pinned here: DONE with a message sends exactly that reply, and the command's
effect follows the reply's code (as the session core's state does); DONE without a
message counts as OK.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted

from qpconn.hooks.results import DENY, DONE
from qpconn.plugins import Plugin
from tests.e2e_client import ehlo, maildir_line, split_message
from tests.support.server import in_thread

RCPT = "<user@mx.test>"
TEXT = b"Subject: done\r\n\r\nbody"  # Client.message adds the final CRLF


class DoneMail(Plugin):
    """Answers MAIL itself with a 250 of its own wording."""

    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        return DONE, "250 2.1.0 taken care of"


class DoneRcptRefuses(Plugin):
    """Answers RCPT itself, with a refusal."""

    def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> Any:
        if recipient.user == "nobody":
            return DONE, "550 5.1.1 no such user here"
        return DONE


class DoneQueue(Plugin):
    """Queues by itself and says DONE without a message."""

    def register(self) -> None:
        self.seen: list[bytes] = []

    def hook_queue(self, transaction: Any) -> Any:
        self.seen.append(transaction.body_bytes())
        return DONE


class DoneVrfy(Plugin):
    def hook_vrfy(self, transaction: Any, arg: str) -> Any:
        return DONE


class DenyQuit(Plugin):
    def hook_quit(self, transaction: Any) -> Any:
        return DENY, "not leaving"


class DoneQuit(Plugin):
    def hook_quit(self, transaction: Any) -> Any:
        return DONE, "221 2.0.0 see you"


@pytest_twisted.ensureDeferred
async def test_done_with_a_250_at_mail_sets_the_sender_that_gets_stored(qpconn_server, tmp_path):
    plugins = [DoneMail, "rcpt_ok", maildir_line(tmp_path / "maildir")]
    server = qpconn_server(plugins=plugins)

    def client():
        with ehlo(server) as smtp:
            mail = smtp.cmd("MAIL FROM:<sender@example.org>")
            return mail, (smtp.cmd(f"RCPT TO:{RCPT}"), smtp.cmd("DATA"), smtp.message(TEXT))

    mail, (rcpt, data, end) = await in_thread(client)
    assert (mail.code, mail.last) == (250, "2.1.0 taken care of")
    assert (rcpt.code, data.code, end.code) == (250, 354, 250)
    (stored,) = server.messages()
    assert split_message(stored)[0][0] == b"Return-Path: <sender@example.org>"


@pytest_twisted.ensureDeferred
async def test_done_with_a_refusal_at_rcpt_adds_no_recipient(qpconn_server, tmp_path):
    server = qpconn_server(plugins=[DoneRcptRefuses, maildir_line(tmp_path / "maildir")])

    def client():
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            refused = smtp.cmd("RCPT TO:<nobody@mx.test>")
            accepted = smtp.cmd(f"RCPT TO:{RCPT}")
            return refused, accepted, smtp.cmd("DATA"), smtp.message(TEXT)

    refused, accepted, data, end = await in_thread(client)
    assert (refused.code, refused.last) == (550, "5.1.1 no such user here")
    assert (accepted.code, data.code, end.code) == (250, 354, 250)
    (stored,) = server.messages()
    head = split_message(stored)[0]
    assert b"Delivered-To: user@mx.test" in head
    assert not any(b"nobody" in line for line in head)


@pytest_twisted.ensureDeferred
async def test_done_without_a_message_at_queue_counts_as_queued(qpconn_server):
    server = qpconn_server(plugins=["rcpt_ok", DoneQueue])

    def client():
        with ehlo(server) as smtp:
            return smtp.transaction("<a@example.org>", [RCPT], TEXT)

    reply = await in_thread(client)
    assert reply.code == 250 and reply.last.startswith("2.0.0 Queued as ")
    assert server.factory.plugins[1].seen == [b"body\r\n"]


@pytest_twisted.ensureDeferred
async def test_done_without_a_message_at_vrfy_counts_as_ok(qpconn_server):
    server = qpconn_server(plugins=[DoneVrfy])

    def client():
        with ehlo(server) as smtp:
            return smtp.cmd("VRFY someone")

    reply = await in_thread(client)
    assert (reply.code, reply.last) == (250, "2.1.5 User OK")


@pytest_twisted.ensureDeferred
async def test_quit_ignores_a_deny_and_honours_done_with_a_reply(qpconn_server):
    deny = qpconn_server(plugins=[DenyQuit])
    done = qpconn_server(plugins=[DoneQuit])

    def client(server):
        with ehlo(server) as smtp:
            return smtp.cmd("QUIT"), smtp.is_closed()

    (denied, denied_closed), (custom, custom_closed) = (
        await in_thread(client, deny), await in_thread(client, done)
    )
    assert denied.code == 221 and denied_closed
    assert (custom.code, custom.last, custom_closed) == (221, "2.0.0 see you", True)
