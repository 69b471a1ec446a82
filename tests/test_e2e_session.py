"""End-to-end: whole SMTP sessions over loopback, as real clients hold them.

Each test starts a real server on 127.0.0.1 and talks to it with ``smtplib``, a raw
socket client (:mod:`tests.e2e_client`) or Twisted's own SMTP client, then looks at the
reply bytes and at what landed in the Maildir.
"""

from __future__ import annotations

import email.utils
import re
import smtplib
import time
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.mail import smtp as twisted_smtp

from tests.e2e_client import Client, ehlo, split_message, watch_errors
from tests.support.server import in_thread

RCPT = "<user@mx.test>"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    """Errors the server logs; a test fails on one it does not expect (and clear)."""
    yield from watch_errors()


# The Received value of qpconn, unfolded: from HELO (host [ip]) by me (software) with
# PROTO id QUEUEID [for <rcpt>]; date
_RECEIVED = re.compile(
    r"^from (?P<helo>\S+) \((?P<host>\S+) \[(?P<ip>[^\]]+)\]\) "
    r"by (?P<me>\S+) \(qpconn [^)]+\) with (?P<proto>\S+) id (?P<id>\S+)"
    r"(?: for (?P<rcpt><[^>]*>))?; (?P<date>.+)$"
)


def received(fields: list[bytes]) -> re.Match[str]:
    values = [f[len(b"Received: ") :].decode() for f in fields if f.startswith(b"Received: ")]
    assert len(values) == 1, fields
    match = _RECEIVED.match(values[0])
    assert match, values[0]
    return match


def assert_recent(date: str) -> None:
    stamp = email.utils.parsedate_to_datetime(date).timestamp()
    assert abs(stamp - time.time()) < 120, date


@pytest_twisted.ensureDeferred
async def test_esmtp_transaction_is_stored_with_trace_fields_and_unstuffed_body(server):
    def client():
        with Client(server.address) as smtp:
            assert smtp.greeting.code == 220
            assert smtp.cmd("EHLO client.test").code == 250
            return smtp.transaction(
                "<sender@example.org>",
                ["<user@mx.test>"],
                b"From: <sender@example.org>\r\nSubject: hello\r\n\r\n"
                b"first line\r\n..leading dot\r\n..\r\nlast",
            )

    reply = await in_thread(client)
    assert reply.code == 250
    (message,) = server.messages()
    fields, body = split_message(message)
    assert fields[0] == b"Return-Path: <sender@example.org>"
    assert fields[1] == b"Delivered-To: user@mx.test"
    assert fields[2].startswith(b"Received: ")
    assert fields[3:] == [b"From: <sender@example.org>", b"Subject: hello"]
    trace = received(fields)
    assert trace["helo"] == "client.test"
    assert trace["host"] == "unknown"
    assert trace["ip"] == "127.0.0.1"
    assert trace["me"] == "mx.test"
    assert trace["proto"] == "ESMTP"
    assert trace["rcpt"] == "<user@mx.test>"
    assert_recent(trace["date"])
    # The 250 names the queue id the Received field carries.
    assert reply.lines == (f"2.0.0 Queued as {trace['id']}",)
    assert body == b"first line\n.leading dot\n.\nlast\n"


@pytest_twisted.ensureDeferred
async def test_helo_session_is_traced_with_smtp_not_esmtp(server):
    def client():
        with Client(server.address) as smtp:
            reply = smtp.cmd("HELO old.client.test")
            assert reply.code == 250 and reply.lines[0].startswith("mx.test ")
            assert len(reply.lines) == 1
            return smtp.transaction("<a@example.org>", ["<user@mx.test>"], b"x: y\r\n\r\nbody")

    assert (await in_thread(client)).code == 250
    (message,) = server.messages()
    trace = received(split_message(message)[0])
    assert trace["proto"] == "SMTP"
    assert trace["helo"] == "old.client.test"


@pytest_twisted.ensureDeferred
async def test_two_recipients_make_one_file_with_two_delivered_to_and_no_for_clause(server):
    def client():
        with smtplib.SMTP(*server.address, timeout=5) as smtp:
            smtp.ehlo("client.test")
            return smtp.sendmail(
                "sender@example.org",
                ["one@mx.test", "two@localhost"],
                b"Subject: both\r\n\r\nhi\r\n",
            )

    assert await in_thread(client) == {}
    (message,) = server.messages()
    fields, body = split_message(message)
    assert fields[:3] == [
        b"Return-Path: <sender@example.org>",
        b"Delivered-To: one@mx.test",
        b"Delivered-To: two@localhost",
    ]
    trace = received(fields)
    assert trace["rcpt"] is None
    assert b" for " not in fields[3]
    assert_recent(trace["date"])
    assert body == b"hi\n"


@pytest_twisted.ensureDeferred
async def test_each_transaction_on_one_connection_gets_its_own_queue_id(server):
    def client():
        with Client(server.address) as smtp:
            smtp.cmd("EHLO client.test")
            first = smtp.transaction("<a@example.org>", ["<u@mx.test>"], b"s: 1\r\n\r\none")
            second = smtp.transaction("<b@example.org>", ["<u@mx.test>"], b"s: 2\r\n\r\ntwo")
            return first, second

    first, second = await in_thread(client)
    assert first.code == second.code == 250
    assert first.lines != second.lines
    stored = {(received(split_message(m)[0])["id"], split_message(m)[1]) for m in server.messages()}
    assert stored == {(first.last.split()[-1], b"one\n"), (second.last.split()[-1], b"two\n")}


@pytest_twisted.ensureDeferred
async def test_message_sent_line_by_line_is_stored_whole_with_lf_line_endings(server):
    text = (
        b"From: <a@example.org>\r\n"
        b"Subject: slow\r\n"
        b"X-Folded: one\r\n\ttwo\r\n"
        b"\r\n"
        b"\xc3\xa9t\xc3\xa9 8-bit body\r\n"
        b"From me\r\n"
    )

    def client():
        with Client(server.address) as smtp:
            smtp.cmd("EHLO client.test")
            smtp.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME")
            smtp.cmd("RCPT TO:<user@mx.test>")
            smtp.cmd("DATA")
            for line in text.splitlines(keepends=True):
                smtp.send(line)
                time.sleep(0.005)  # separate segments: the header arrives in pieces
            smtp.send(b".\r\n")
            return smtp.reply()

    assert (await in_thread(client)).code == 250
    (message,) = server.messages()
    fields, _ = split_message(message)
    assert fields[3:] == [b"From: <a@example.org>", b"Subject: slow", b"X-Folded: one two"]
    assert message.endswith(b"\n" + text.replace(b"\r\n", b"\n"))


@pytest_twisted.ensureDeferred
async def test_lowercase_commands_null_sender_and_space_after_colon_are_accepted(server):
    def client():
        with Client(server.address) as smtp:
            smtp.cmd("ehlo client.test")
            replies = [smtp.cmd("mail from: <>"), smtp.cmd("rcpt to: <user@mx.test>")]
            replies += [smtp.cmd("data"), smtp.message(b"Subject: bounce\r\n\r\nsorry")]
            return replies

    replies = await in_thread(client)
    assert [r.code for r in replies] == [250, 250, 354, 250]
    (message,) = server.messages()
    assert message.startswith(b"Return-Path: <>\nDelivered-To: user@mx.test\n")


@pytest_twisted.ensureDeferred
async def test_smtplib_gets_refused_recipients_back_and_the_rest_is_delivered(server):
    def client():
        with smtplib.SMTP(*server.address, timeout=5) as smtp:
            smtp.ehlo("client.test")
            return smtp.sendmail(
                "a@example.org", ["x@elsewhere.example", "user@mx.test"], b"Subject: s\r\n\r\nb"
            )

    refused = await in_thread(client)
    assert list(refused) == ["x@elsewhere.example"]
    assert refused["x@elsewhere.example"][0] == 550
    (message,) = server.messages()
    fields, _ = split_message(message)
    assert [f for f in fields if f.startswith(b"Delivered-To:")] == [b"Delivered-To: user@mx.test"]


@pytest_twisted.ensureDeferred
async def test_twisted_smtp_client_delivers_a_message(server):
    host, port = server.address
    # Twisted's client turns LF into CRLF itself: the file holds LF line ends.
    message = BytesIO(b"From: a@example.org\nSubject: twisted\n\nfrom twisted.mail\n")
    result = await twisted_smtp.sendmail(
        host,
        "a@example.org",
        ["user@mx.test"],
        message,
        senderDomainName="twisted.client.test",
        port=port,
        reactor=reactor,
    )
    accepted, per_recipient = result
    assert accepted == 1
    assert [(addr, code) for addr, code, _ in per_recipient] == [(b"user@mx.test", 250)]
    (stored,) = server.messages()
    fields, body = split_message(stored)
    assert received(fields)["helo"] == "twisted.client.test"
    assert body == b"from twisted.mail\n"


@pytest_twisted.ensureDeferred
async def test_ehlo_reply_is_multiline_and_advertises_extensions_with_configured_size(
    qpconn_server,
):
    server = qpconn_server(files={"databytes": "123456"})

    def client():
        with Client(server.address) as smtp:
            smtp.send(b"EHLO client.test\r\n")
            raw = smtp.sock.recv(65536)
            while not re.search(rb"(^|\r\n)250 [^\r\n]*\r\n$", raw):
                more = smtp.sock.recv(65536)
                assert more, raw
                raw += more
            return raw

    raw = await in_thread(client)
    lines = raw.split(b"\r\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    assert all(line.startswith(b"250-") for line in lines[:-1]), lines
    assert lines[-1].startswith(b"250 ")
    assert lines[0] == b"250-mx.test Hi unknown [127.0.0.1]"
    keywords = [line[4:] for line in lines[1:]]
    assert set(keywords) >= {b"PIPELINING", b"8BITMIME", b"SIZE 123456", b"ENHANCEDSTATUSCODES"}


@pytest_twisted.ensureDeferred
async def test_smtplib_sees_the_advertised_extensions(server):
    def client():
        with smtplib.SMTP(*server.address, timeout=5) as smtp:
            smtp.ehlo("client.test")
            return dict(smtp.esmtp_features)

    features = await in_thread(client)
    assert {"pipelining", "8bitmime", "size", "enhancedstatuscodes"} <= set(features)
    # No databytes file: the config default (50 MiB) is what SIZE announces.
    assert features["size"] == "52428800"


@pytest_twisted.ensureDeferred
async def test_replies_carry_enhanced_status_codes(server):
    def client():
        with Client(server.address) as smtp:
            return [
                smtp.cmd("EHLO client.test").code,
                smtp.cmd("MAIL FROM:<a@example.org>"),
                smtp.cmd("RCPT TO:<user@mx.test>"),
                smtp.cmd("RSET"),
                smtp.cmd("NOOP"),
                smtp.cmd("QUIT"),
            ]

    ehlo, mail, rcpt, rset, noop, quit_ = await in_thread(client)
    assert ehlo == 250
    assert (mail.code, mail.last) == (250, "2.1.0 <a@example.org>, sender OK")
    assert (rcpt.code, rcpt.last) == (250, "2.1.5 <user@mx.test>, recipient ok")
    assert (rset.code, rset.last) == (250, "2.0.0 OK")
    assert (noop.code, noop.last) == (250, "2.0.0 OK")
    assert quit_.code == 221 and quit_.last.startswith("2.0.0 ")


@pytest_twisted.ensureDeferred
async def test_small_commands_noop_vrfy_help_and_quit_closes(server):
    def client():
        with Client(server.address) as smtp:
            replies = [smtp.cmd(line) for line in ("NOOP", "VRFY someone", "HELP", "NOOP x")]
            replies.append(smtp.cmd("QUIT"))
            return replies, smtp.is_closed()

    (noop, vrfy, help_, noop_arg, quit_), closed = await in_thread(client)
    assert noop.code == 250 and noop_arg.code == 250
    assert (vrfy.code, vrfy.last.split()[0]) == (252, "2.5.2")
    assert help_.code == 214 and len(help_.lines) >= 2
    assert quit_.code == 221
    assert closed


@pytest_twisted.ensureDeferred
async def test_rset_forgets_sender_and_recipients(server):
    def client():
        with Client(server.address) as smtp:
            smtp.cmd("EHLO client.test")
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.cmd("RCPT TO:<user@mx.test>")
            rset = smtp.code("RSET")
            after = [smtp.code("RCPT TO:<user@mx.test>"), smtp.code("DATA")]
            # A new transaction starts cleanly and stores only its own recipient.
            last = smtp.transaction("<b@example.org>", ["<other@mx.test>"], b"s: x\r\n\r\nx")
            return rset, after, last.code

    rset, after, last = await in_thread(client)
    assert rset == 250
    assert after == [503, 503]
    assert last == 250
    (message,) = server.messages()
    fields, _ = split_message(message)
    assert fields[:2] == [b"Return-Path: <b@example.org>", b"Delivered-To: other@mx.test"]


@pytest_twisted.ensureDeferred
async def test_new_ehlo_abandons_the_open_transaction(server):
    def client():
        with Client(server.address) as smtp:
            smtp.cmd("EHLO client.test")
            smtp.cmd("MAIL FROM:<a@example.org>")
            return smtp.code("EHLO again.test"), smtp.code("RCPT TO:<user@mx.test>")

    assert await in_thread(client) == (250, 503)


@pytest_twisted.ensureDeferred
async def test_empty_message_is_accepted_and_stored_with_trace_fields_only(server):
    def client():
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.cmd(f"RCPT TO:{RCPT}")
            smtp.cmd("DATA")
            smtp.send(b".\r\n")
            return smtp.reply()

    assert (await in_thread(client)).code == 250
    (message,) = server.messages()
    fields, body = split_message(message)
    assert [f.split(b":")[0] for f in fields] == [b"Return-Path", b"Delivered-To", b"Received"]
    assert body == b""


@pytest_twisted.ensureDeferred
async def test_hostile_helo_name_cannot_shape_the_received_field(server):
    def client():
        with Client(server.address) as smtp:
            smtp.cmd("EHLO x)\t(by evil.example with ESMTP id 1; x")
            return smtp.transaction("<a@example.org>", [RCPT], b"s: x\r\n\r\nx")

    assert (await in_thread(client)).code == 250
    (message,) = server.messages()
    trace = received(split_message(message)[0])
    assert trace["helo"] == "x???by?evil.example?with?ESMTP?id?1;?x"
    assert trace["me"] == "mx.test"


@pytest_twisted.ensureDeferred
async def test_helo_starts_a_fresh_transaction_even_without_helo_hooks(qpconn_server, tmp_path):
    """Transaction notes made before HELO (a connect hook's) do not reach the message's
    hooks, whether or not a helo/ehlo hook runs (without one the server may keep an
    untouched transaction rather than make a new one: never one that holds notes)."""
    from qpconn.plugins import Plugin

    class NoteEarly(Plugin):
        seen: list[Any] = []

        def hook_connect(self, transaction: Any) -> Any:
            transaction.notes["early"] = "connect"
            return None

        def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
            NoteEarly.seen.append((transaction.notes.get("early"), transaction.id))
            return None

    server = qpconn_server(plugins=[NoteEarly, "rcpt_ok", f"queue/maildir {tmp_path / 'maildir'}"])

    def client():
        with Client(server.address) as smtp:
            smtp.cmd("EHLO client.test")
            done = smtp.transaction("<a@example.org>", ["<user@mx.test>"], b"s: 1\r\n\r\none")
            smtp.cmd("EHLO again.test")  # an untouched transaction: nothing to start over
            again = smtp.transaction("<b@example.org>", ["<user@mx.test>"], b"s: 2\r\n\r\ntwo")
            return done, again

    done, again = await in_thread(client)
    assert done.code == again.code == 250
    (first, _), (second, _) = NoteEarly.seen
    assert first is None and second is None
    ids = [received(split_message(m)[0])["id"] for m in server.messages()]
    assert len(set(ids)) == 2  # every message its own queue id
