"""End-to-end: plugins written the ways plugin authors write them, in a real session.

The plugins are defined here, small and each for one behaviour. They answer directly, by
Deferred, from ``async def``, by raising or by never answering at all, and use what the
hooks are handed (connection fields, notes, the header); the tests check the replies a
client sees and what reaches the Maildir.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from qpconn.hooks.results import DENY, OK
from qpconn.plugins import Plugin
from tests.e2e_client import Client, describe, ehlo, maildir_line, plugin_of, watch_errors
from tests.support.server import in_thread
from tests.support.timing import assert_within_timeout

RCPT = "<user@mx.test>"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    """Errors the server logs; a test fails on one it does not expect (and clear)."""
    yield from watch_errors()


# -- plugins ----------------------------------------------------------------------------


class AsyncPlugin(Plugin):
    """async def hooks: accept async.test recipients; deny messages whose Subject says so."""

    async def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> Any:
        await task.deferLater(reactor, 0.01, lambda: None)
        return OK if recipient.host == "async.test" else None

    async def hook_data_post(self, transaction: Any) -> Any:
        await task.deferLater(reactor, 0.01, lambda: None)
        if transaction.header.get("Subject") == "deny me":
            return DENY, "5.7.1 async says no"
        return None


class Boom(Plugin):
    """mail: raises for boom@ senders."""

    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        if sender.user == "boom":
            raise RuntimeError("plugin bug")
        return None


class Hang(Plugin):
    """mail: never answers for hang@ senders; allowed 0.3 s."""

    timeout = 0.3

    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        return defer.Deferred() if sender.user == "hang" else None


class HelloRecorder(Plugin):
    """Records what connection.hello/hello_host are while hooks run."""

    def register(self) -> None:
        self.seen: list[tuple[str, str | None, str | None]] = []

    def _record(self, stage: str, transaction: Any) -> None:
        conn = transaction.connection
        self.seen.append((stage, conn.hello, conn.hello_host))

    def hook_helo(self, transaction: Any, host: str) -> None:
        self._record("helo", transaction)

    def hook_ehlo(self, transaction: Any, host: str) -> None:
        self._record("ehlo", transaction)

    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> None:
        self._record("mail", transaction)


class JudgeEhlo(Plugin):
    """ehlo: refuse bad.test; advertise X-TEST through transaction notes."""

    def hook_ehlo(self, transaction: Any, host: str) -> Any:
        if host == "bad.test":
            return DENY
        transaction.notes.setdefault("capabilities", []).append("X-TEST")
        return None


class RewriteSender(Plugin):
    def hook_mail_pre(self, transaction: Any, arg: str) -> Any:
        return OK, "<rewritten@x.example>"


class NoteWriter(Plugin):
    def hook_connect(self, transaction: Any) -> None:
        transaction.connection.notes["greeted_by"] = "NoteWriter"

    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> None:
        transaction.connection.notes("sender_user", sender.user)


class NoteReader(Plugin):
    def register(self) -> None:
        self.seen: list[tuple[Any, Any]] = []

    def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> None:
        notes = transaction.connection.notes
        self.seen.append((notes("greeted_by"), notes["sender_user"]))


class DenyMail(Plugin):
    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        return DENY, "5.7.1 not you"


class DenyWatcher(Plugin):
    def register(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def hook_deny(self, transaction: Any, plugin: str, hook: str, result: Any, msg: Any) -> None:
        self.seen.append((plugin, hook, result, msg))


class CustomReceived(Plugin):
    def hook_received_line(self, transaction: Any) -> Any:
        return OK, f"from custom.example by mx.test id {transaction.id}; custom"


class DisconnectRecorder(Plugin):
    def register(self) -> None:
        self.seen: list[str | None] = []

    def hook_disconnect(self, transaction: Any) -> None:
        self.seen.append(transaction.connection.remote_ip)


# -- tests ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_async_def_plugin_accepts_recipients_and_denies_at_data_post(qpconn_server, tmp_path):
    server = qpconn_server(plugins=[AsyncPlugin, maildir_line(tmp_path / "maildir")])

    def client():
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            foreign = smtp.cmd("RCPT TO:<x@other.test>")
            smtp.cmd("RSET")
            denied = smtp.transaction(
                "<a@example.org>", ["<u@async.test>"], b"Subject: deny me\r\n\r\nx"
            )
            passed = smtp.transaction(
                "<a@example.org>", ["<u@async.test>"], b"Subject: fine\r\n\r\ny"
            )
            return foreign, denied, passed

    foreign, denied, passed = await in_thread(client)
    assert foreign.code == 450  # the async hook declined and nobody else decided
    assert (denied.code, denied.last) == (552, "5.7.1 async says no")
    assert passed.code == 250
    (message,) = server.messages()
    assert b"Subject: fine\n" in message


@pytest_twisted.ensureDeferred
async def test_plugin_that_raises_gives_451_and_the_server_keeps_serving(
    qpconn_server, tmp_path, errors
):
    server = qpconn_server(plugins=[Boom, "rcpt_ok", maildir_line(tmp_path / "maildir")])

    def client():
        with ehlo(server) as first:
            failed = first.cmd("MAIL FROM:<boom@example.org>")
            same_session = first.code("MAIL FROM:<fine@example.org>")
            with ehlo(server) as second:
                other = second.transaction("<b@example.org>", [RCPT], b"s: x\r\n\r\nok")
            return failed, same_session, other

    failed, same_session, other = await in_thread(client)
    assert (failed.code, failed.last.split()[0]) == (451, "4.3.0")
    assert same_session == 250
    assert other.code == 250
    assert len(server.messages()) == 1
    (logged,) = errors
    assert "RuntimeError: plugin bug" in describe(logged)
    errors.clear()


@pytest_twisted.ensureDeferred
async def test_plugin_that_never_answers_gets_451_after_its_own_timeout(qpconn_server, errors):
    server = qpconn_server(plugins=[Hang])

    def client():
        with ehlo(server) as smtp:
            started = time.monotonic()
            reply = smtp.cmd("MAIL FROM:<hang@example.org>")
            elapsed = time.monotonic() - started
            return reply, elapsed, smtp.code("MAIL FROM:<quick@example.org>")

    reply, elapsed, next_mail = await in_thread(client)
    assert (reply.code, reply.last.split()[0]) == (451, "4.3.0")
    # its own 0.3 s, not the 30 s plugin_timeout default
    assert_within_timeout(elapsed, fired=Hang.timeout, instead_of=30)
    assert next_mail == 250
    (logged,) = errors
    assert "TimeoutError" in describe(logged)
    errors.clear()


@pytest_twisted.ensureDeferred
async def test_hello_fields_are_none_inside_helo_hooks_and_set_afterwards(qpconn_server):
    server = qpconn_server(plugins=[HelloRecorder])

    def client():
        with Client(server.address) as smtp:
            smtp.cmd("HELO first.test")
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.cmd("EHLO second.test")
            smtp.cmd("MAIL FROM:<a@example.org>")

    await in_thread(client)
    assert plugin_of(server, HelloRecorder).seen == [
        ("helo", None, None),
        ("mail", "helo", "first.test"),
        ("ehlo", None, None),
        ("mail", "ehlo", "second.test"),
    ]


@pytest_twisted.ensureDeferred
async def test_refused_ehlo_keeps_the_open_transaction_and_its_sender(qpconn_server, tmp_path):
    server = qpconn_server(plugins=[JudgeEhlo, "rcpt_ok", maildir_line(tmp_path / "maildir")])

    def client():
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            refused = smtp.cmd("EHLO bad.test")
            rest = [smtp.code(f"RCPT TO:{RCPT}"), smtp.code("DATA")]
            return refused, rest, smtp.message(b"s: x\r\n\r\nx")

    refused, rest, stored = await in_thread(client)
    assert refused.code == 550
    assert rest == [250, 354] and stored.code == 250
    (message,) = server.messages()
    assert message.startswith(b"Return-Path: <a@example.org>\n")
    # The trace still names the greeting that was accepted.
    assert b"Received: from client.test " in message


@pytest_twisted.ensureDeferred
async def test_ehlo_hook_capabilities_are_advertised_once_per_ehlo(qpconn_server):
    server = qpconn_server(plugins=[JudgeEhlo])

    def client():
        with Client(server.address) as smtp:
            return smtp.cmd("EHLO one.test"), smtp.cmd("EHLO two.test")

    first, second = await in_thread(client)
    assert first.lines[-1] == second.lines[-1] == "X-TEST"
    assert second.lines.count("X-TEST") == 1


@pytest_twisted.ensureDeferred
async def test_mail_pre_plugin_rewrites_the_sender(qpconn_server, tmp_path):
    server = qpconn_server(plugins=[RewriteSender, "rcpt_ok", maildir_line(tmp_path / "maildir")])

    def client():
        with ehlo(server) as smtp:
            mail = smtp.cmd("MAIL FROM:<original@example.org>")
            smtp.cmd(f"RCPT TO:{RCPT}")
            smtp.cmd("DATA")
            return mail, smtp.message(b"s: x\r\n\r\nx")

    mail, stored = await in_thread(client)
    assert mail.last == "2.1.0 <rewritten@x.example>, sender OK"
    assert stored.code == 250
    (message,) = server.messages()
    assert message.startswith(b"Return-Path: <rewritten@x.example>\n")


@pytest_twisted.ensureDeferred
async def test_plugins_share_connection_notes_by_key_and_by_call(qpconn_server):
    server = qpconn_server(plugins=[NoteWriter, NoteReader, "rcpt_ok"])

    def client():
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<alice@example.org>")
            smtp.cmd(f"RCPT TO:{RCPT}")

    await in_thread(client)
    assert plugin_of(server, NoteReader).seen == [("NoteWriter", "alice")]


@pytest_twisted.ensureDeferred
async def test_deny_hook_is_told_which_plugin_denied(qpconn_server):
    server = qpconn_server(plugins=[DenyWatcher, DenyMail])

    def client():
        with ehlo(server) as smtp:
            return smtp.cmd("MAIL FROM:<a@example.org>")

    reply = await in_thread(client)
    assert (reply.code, reply.last) == (550, "5.7.1 not you")
    assert plugin_of(server, DenyWatcher).seen == [("DenyMail", "mail", DENY, "5.7.1 not you")]


@pytest_twisted.ensureDeferred
async def test_received_line_hook_replaces_the_received_value(qpconn_server, tmp_path):
    server = qpconn_server(plugins=["rcpt_ok", CustomReceived, maildir_line(tmp_path / "maildir")])

    def client():
        with ehlo(server) as smtp:
            return smtp.transaction("<a@example.org>", [RCPT], b"s: x\r\n\r\nx")

    reply = await in_thread(client)
    queue_id = reply.last.split()[-1]
    (message,) = server.messages()
    received = [line for line in message.split(b"\n") if line.startswith(b"Received:")]
    assert received == [f"Received: from custom.example by mx.test id {queue_id}; custom".encode()]


@pytest_twisted.ensureDeferred
async def test_disconnect_hook_runs_when_the_client_drops_without_quit(qpconn_server):
    server = qpconn_server(plugins=[DisconnectRecorder])

    def client():
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")

    await in_thread(client)
    await server.wait_sessions_closed()
    assert plugin_of(server, DisconnectRecorder).seen == ["127.0.0.1"]
