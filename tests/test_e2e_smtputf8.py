"""End-to-end: SMTPUTF8 (RFC 6531/6532) with smtplib and raw sockets."""

from __future__ import annotations

import smtplib
from typing import Any

import pytest_twisted

from qpconn.mail.smtputf8 import a_label
from qpconn.plugins import Plugin
from tests.e2e_client import ehlo, plugin_of, split_message
from tests.support.server import in_thread

MESSAGE = "From: Jörg <jörg@bücher.example>\r\nSubject: Grüße\r\n\r\nHallo, Welt!\r\n"


class Seen(Plugin):
    """Keeps the addresses the rcpt hook was given."""

    def register(self) -> None:
        self.rcpts: list[Any] = []

    def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> Any:
        self.rcpts.append(recipient)


def start(qpconn_server: Any) -> Any:
    return qpconn_server(
        plugins=[Seen, "relay", "rcpt_ok", "queue/maildir maildir"],
        files={"rcpthosts": ["mx.test", "xn--bcher-kva.test", "møller.test"]},
    )


def test_a_label_of_configured_names() -> None:
    assert a_label("Møller.Test.") == "møller.test".encode("idna").decode()
    assert a_label(".bücher.test") == ".xn--bcher-kva.test"
    assert a_label("plain.test") == "plain.test"


@pytest_twisted.ensureDeferred
async def test_utf8_message_with_smtplib(qpconn_server, tmp_path):
    server = start(qpconn_server)
    mller = "møller.test".encode("idna").decode()

    def client():
        with smtplib.SMTP(*server.address, timeout=5) as smtp:
            smtp.ehlo("client.test")
            offered = smtp.has_extn("smtputf8")
            refused = smtp.sendmail(
                "jörg@bücher.example",
                ["用户@bücher.test", f"ascii@{mller}", "ü@mx.test"],
                MESSAGE.encode(),
                mail_options=["SMTPUTF8"],
            )
            return offered, refused

    offered, refused = await in_thread(client)
    assert offered and refused == {}
    (stored,) = (tmp_path / "maildir" / "new").iterdir()
    fields, body = split_message(stored.read_bytes())
    received = next(f for f in fields if f.startswith(b"Received:"))
    assert b" with UTF8SMTP id " in received
    assert "Subject: Grüße".encode() in fields
    assert body == b"Hallo, Welt!\n"
    first = plugin_of(server, Seen).rcpts[0]
    # Both forms kept: as the client wrote it, and in A-labels for DNS and next hops.
    assert (first.user, first.host) == ("用户", "bücher.test")
    assert first.host_ascii == "xn--bcher-kva.test"


@pytest_twisted.ensureDeferred
async def test_utf8_without_smtputf8_is_553_5_6_7(qpconn_server):
    server = start(qpconn_server)

    def client():
        with ehlo(server) as smtp:
            sender = smtp.cmd("MAIL FROM:<jörg@bücher.example>".encode())
            assert smtp.code("MAIL FROM:<a@example.org>") == 250
            rcpt = smtp.cmd("RCPT TO:<ü@mx.test>".encode())
            noop = smtp.cmd("NOOP café".encode())
            smtp.cmd("RSET")
            value = smtp.cmd("MAIL FROM:<a@example.org> SMTPUTF8=yes")
            bad_utf8 = smtp.cmd(b"MAIL FROM:<\xff@example.org> SMTPUTF8")
            return sender, rcpt, noop, value, bad_utf8

    sender, rcpt, noop, value, bad_utf8 = await in_thread(client)
    assert (sender.code, sender.last[:5]) == (553, "5.6.7")
    assert (rcpt.code, rcpt.last[:5]) == (553, "5.6.7")
    assert noop.code == 500
    assert (value.code, value.last) == (501, "5.5.4 Syntax: SMTPUTF8 takes no value")
    assert bad_utf8.code == 500


@pytest_twisted.ensureDeferred
async def test_smtputf8_with_bdat_and_an_a_label_recipient(qpconn_server, tmp_path):
    """BDAT carries the UTF-8 message as well; the Received word stays UTF8SMTP."""
    server = start(qpconn_server)
    text = MESSAGE.encode()

    def client():
        with ehlo(server) as smtp:
            assert smtp.code("MAIL FROM:<jörg@bücher.example> SMTPUTF8".encode()) == 250
            assert smtp.code("RCPT TO:<ü@xn--bcher-kva.test>".encode()) == 250
            smtp.send(b"BDAT %d LAST\r\n" % len(text) + text)
            return smtp.reply()

    reply = await in_thread(client)
    assert reply.code == 250
    (stored,) = (tmp_path / "maildir" / "new").iterdir()
    assert b"with UTF8SMTP id" in stored.read_bytes()


def test_received_words_for_every_combination() -> None:
    from qpconn.mail.connection import Connection
    from qpconn.mail.smtputf8 import received_protocol
    from qpconn.mail.transaction import Transaction

    conn = Connection(remote_ip="127.0.0.1")
    conn.hello = "ehlo"
    txn = Transaction(conn)
    words = []
    for utf8, tls, auth, lmtp in [(0, 0, 0, 0), (1, 0, 0, 0), (1, 1, 0, 0), (1, 1, 1, 0),
                                  (0, 1, 1, 0), (0, 0, 0, 1), (1, 1, 0, 1)]:
        txn.mail_params = {"SMTPUTF8": None} if utf8 else {}
        conn.tls = {"version": "TLSv1.3"} if tls else None
        conn.auth_user = "u" if auth else None
        words.append(received_protocol(conn, txn, bool(lmtp)))
    assert words == ["ESMTP", "UTF8SMTP", "UTF8SMTPS", "UTF8SMTPSA", "ESMTPSA", "LMTP",
                     "UTF8LMTPS"]
    txn.close()


@pytest_twisted.ensureDeferred
async def test_received_says_utf8smtps_after_starttls(qpconn_server, tmp_path):
    from tests.support.tlscerts import make_pki

    pki = make_pki(str(tmp_path / "pki"))
    server = qpconn_server(files={"tls_cert": pki.cert, "tls_key": pki.key})

    def client():
        with smtplib.SMTP(*server.address, timeout=5) as smtp:
            smtp.starttls(context=pki.client_context())
            smtp.ehlo("client.test")
            smtp.sendmail("jörg@example.org", ["ü@mx.test"], MESSAGE.encode(),
                          mail_options=["SMTPUTF8"])  # fmt: skip

    await in_thread(client)
    (message,) = server.messages()
    assert b" with UTF8SMTPS (" in message.replace(b"\r\n\t", b" ")
