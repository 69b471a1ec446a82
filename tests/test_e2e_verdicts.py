"""End-to-end: the reply each hook verdict gives, and the shipped relay check.

What a client sees when no plugin decides (rcpt, queue), when a plugin denies (with or
without disconnecting) at connect, mail, data_headers_end and data_post, and how
``relay`` and ``rcpt_ok`` judge recipients from ``relayclients`` and ``rcpthosts``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.hooks.results import DENY, DENY_DISCONNECT
from qpconn.plugins import Plugin
from tests.e2e_client import Client, ehlo, maildir_line, plugin_of, watch_errors
from tests.support.server import in_thread

RCPT = "<user@mx.test>"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    """Errors the server logs; a test fails on one it does not expect (and clear)."""
    yield from watch_errors()


class DenyDisconnectMail(Plugin):
    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        return DENY_DISCONNECT


class DenyConnect(Plugin):
    def hook_connect(self, transaction: Any) -> Any:
        return DENY


class DenyDataPost(Plugin):
    def hook_data_post(self, transaction: Any) -> Any:
        return DENY


class DenyHeaders(Plugin):
    def register(self) -> None:
        self.subjects: list[str | None] = []

    def hook_data_headers_end(self, transaction: Any) -> Any:
        self.subjects.append(transaction.header.get("Subject"))
        return DENY, "5.7.1 header refused"


# -- verdicts ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connect_deny_gives_550_greeting_and_closes(qpconn_server):
    server = qpconn_server(plugins=[DenyConnect])

    def client():
        with Client(server.address) as smtp:
            return smtp.greeting, smtp.is_closed()

    greeting, closed = await in_thread(client)
    assert (greeting.code, greeting.last.split()[0]) == (550, "5.7.1")
    assert closed


@pytest_twisted.ensureDeferred
async def test_deny_disconnect_at_mail_gives_550_and_closes(qpconn_server):
    server = qpconn_server(plugins=[DenyDisconnectMail])

    def client():
        with ehlo(server) as smtp:
            return smtp.cmd("MAIL FROM:<a@example.org>"), smtp.is_closed()

    reply, closed = await in_thread(client)
    assert (reply.code, reply.last.split()[0]) == (550, "5.7.1")
    assert closed


@pytest_twisted.ensureDeferred
async def test_rcpt_without_a_deciding_plugin_gets_450(qpconn_server):
    server = qpconn_server(plugins=[])

    def client():
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            return smtp.cmd(f"RCPT TO:{RCPT}")

    reply = await in_thread(client)
    assert (reply.code, reply.last.split()[0]) == (450, "4.7.1")


@pytest_twisted.ensureDeferred
async def test_message_without_a_queue_plugin_gets_451(qpconn_server):
    server = qpconn_server(plugins=["rcpt_ok"])

    def client():
        with ehlo(server) as smtp:
            return smtp.transaction("<a@example.org>", [RCPT], b"s: x\r\n\r\nx")

    reply = await in_thread(client)
    assert (reply.code, reply.last.split()[0]) == (451, "4.3.0")


@pytest_twisted.ensureDeferred
async def test_data_post_deny_gives_552_and_stores_nothing(qpconn_server, tmp_path):
    server = qpconn_server(plugins=["rcpt_ok", DenyDataPost, maildir_line(tmp_path / "maildir")])

    def client():
        with ehlo(server) as smtp:
            return smtp.transaction("<a@example.org>", [RCPT], b"s: x\r\n\r\nx")

    reply = await in_thread(client)
    assert (reply.code, reply.last) == (552, "5.7.1 Message denied")
    assert server.messages() == []


@pytest_twisted.ensureDeferred
async def test_data_headers_end_deny_is_given_after_the_whole_message(qpconn_server, tmp_path):
    server = qpconn_server(plugins=["rcpt_ok", DenyHeaders, maildir_line(tmp_path / "maildir")])

    def client():
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.cmd(f"RCPT TO:{RCPT}")
            smtp.cmd("DATA")
            # Body lines that look like commands must be read as text, not answered.
            reply = smtp.message(b"Subject: hdr\r\nX: y\r\n\r\nNOOP\r\nRSET\r\n" * 3)
            return reply, smtp.code("NOOP")

    reply, noop = await in_thread(client)
    assert (reply.code, reply.last) == (552, "5.7.1 header refused")
    assert noop == 250
    assert plugin_of(server, DenyHeaders).subjects == ["hdr"]
    assert server.messages() == []


# -- relay ------------------------------------------------------------------------------


def rcpt_codes(server, recipients: list[str]) -> list[Any]:
    with ehlo(server) as smtp:
        assert smtp.code("MAIL FROM:<a@example.org>") == 250
        return [smtp.cmd(f"RCPT TO:{rcpt}") for rcpt in recipients]


@pytest_twisted.ensureDeferred
async def test_foreign_recipient_is_relaying_denied_without_relayclients(server):
    replies = await in_thread(rcpt_codes, server, ["<x@elsewhere.example>", RCPT])
    assert [(r.code, r.last.split()[0]) for r in replies] == [(550, "5.7.1"), (250, "2.1.5")]


@pytest_twisted.ensureDeferred
async def test_relayclients_entry_for_the_client_lets_it_relay(qpconn_server):
    server = qpconn_server(files={"relayclients": ["127.0.0.1"]})

    def client():
        with ehlo(server) as smtp:
            return smtp.transaction("<a@example.org>", ["<x@elsewhere.example>"], b"s: x\r\n\r\nx")

    assert (await in_thread(client)).code == 250
    (message,) = server.messages()
    assert b"Delivered-To: x@elsewhere.example\n" in message


@pytest_twisted.ensureDeferred
async def test_dot_suffix_in_rcpthosts_accepts_subdomains_but_not_the_domain(qpconn_server):
    server = qpconn_server(files={"rcpthosts": [".example.net"]})
    recipients = ["<a@mail.example.net>", "<b@deep.sub.example.net>", "<c@example.net>"]
    replies = await in_thread(rcpt_codes, server, [*recipients, "<d@notexample.net>"])
    assert [r.code for r in replies] == [250, 250, 550, 550]


@pytest_twisted.ensureDeferred
async def test_postmaster_without_domain_is_always_accepted(qpconn_server):
    server = qpconn_server(files={"rcpthosts": ["nothing.example"]})
    replies = await in_thread(rcpt_codes, server, ["<postmaster>", "<PostMaster>", RCPT])
    # mx.test is still ours as "me"; localhost no longer is.
    assert [r.code for r in replies] == [250, 250, 250]
    refused = await in_thread(rcpt_codes, server, ["<user@localhost>"])
    assert [r.code for r in refused] == [550]


# -- queue/maildir with templates --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_maildir_template_stores_one_copy_per_recipient_directory(qpconn_server, tmp_path):
    template = tmp_path / "boxes" / "%d" / "%u"
    server = qpconn_server(
        plugins=["rcpt_ok", maildir_line(template)], files={"rcpthosts": ["mx.test", "other.test"]}
    )

    def client():
        with ehlo(server) as smtp:
            return smtp.transaction(
                "<a@example.org>",
                ["<jo+tag@mx.test>", "<jo-x@mx.test>", "<Ann@Other.test>"],
                b"s: x\r\n\r\nshared",
            )

    assert (await in_thread(client)).code == 250
    boxes = tmp_path / "boxes"
    found = {
        str(path.parent.parent.relative_to(boxes)): path.read_bytes()
        for path in boxes.glob("*/*/new/*")
    }
    assert sorted(found) == ["mx.test/jo", "other.test/ann"]
    assert (
        b"Delivered-To: jo+tag@mx.test\nDelivered-To: jo-x@mx.test\nReceived:"
        in found["mx.test/jo"]
    )
    assert b"Delivered-To: Ann@Other.test\nReceived:" in found["other.test/ann"]
    assert all(message.endswith(b"\n\nshared\n") for message in found.values())
