"""End-to-end: what a client that gets things wrong is told, and that the session survives.

Sequence and syntax errors, unknown commands and parameters, bytes a command line may not
hold, the end-of-data rule that SMTP smuggling attacks, and a Maildir that cannot be
written. After each error the test checks that the session is still in step: the next
command gets its own reply, not the leftovers of the previous one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from tests.e2e_client import Client, describe, ehlo, watch_errors
from tests.support.server import in_thread

RCPT = "<user@mx.test>"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    """Errors the server logs; a test fails on one it does not expect (and clear)."""
    yield from watch_errors()


@pytest_twisted.ensureDeferred
async def test_commands_out_of_sequence_get_503_and_change_nothing(server):
    def client():
        with Client(server.address) as smtp:
            before_helo = [smtp.cmd("MAIL FROM:<a@example.org>"), smtp.cmd(f"RCPT TO:{RCPT}")]
            smtp.cmd("EHLO client.test")
            rcpt_first = smtp.cmd(f"RCPT TO:{RCPT}")
            data_first = smtp.cmd("DATA")
            smtp.cmd("MAIL FROM:<a@example.org>")
            data_no_rcpt = smtp.cmd("DATA")
            nested = smtp.cmd("MAIL FROM:<b@example.org>")
            # The first MAIL still stands: the transaction goes through with its sender.
            last = [smtp.code(f"RCPT TO:{RCPT}"), smtp.code("DATA"), smtp.message(b"s: x\r\n")]
            return before_helo, rcpt_first, data_first, data_no_rcpt, nested, last

    before_helo, rcpt_first, data_first, data_no_rcpt, nested, last = await in_thread(client)
    assert [r.code for r in before_helo] == [503, 503]
    assert before_helo[0].last.startswith("5.5.1 ")
    assert [r.code for r in (rcpt_first, data_first, data_no_rcpt, nested)] == [503] * 4
    assert "nested MAIL" in nested.last
    assert last[:2] == [250, 354] and last[2].code == 250
    (message,) = server.messages()
    assert message.startswith(b"Return-Path: <a@example.org>\n")


@pytest_twisted.ensureDeferred
async def test_data_after_every_recipient_was_refused_gets_554(server):
    def client():
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            refused = smtp.cmd("RCPT TO:<someone@elsewhere.example>")
            data = smtp.cmd("DATA")
            return refused, data, smtp.code("NOOP")

    refused, data, noop = await in_thread(client)
    assert refused.code == 550
    assert (data.code, data.last.split()[0]) == (554, "5.5.1")
    assert noop == 250


@pytest_twisted.ensureDeferred
async def test_syntax_errors_get_501_and_the_session_stays_usable(server):
    def client():
        with Client(server.address) as smtp:
            replies = [smtp.cmd("HELO"), smtp.cmd("EHLO ")]
            smtp.cmd("EHLO client.test")
            replies += [
                smtp.cmd("MAIL <a@example.org>"),
                smtp.cmd("MAIL TO:<a@example.org>"),
                smtp.cmd("MAIL FROM:<a@b@c>"),
                smtp.cmd("MAIL FROM:<unclosed@example.org"),
            ]
            smtp.cmd("MAIL FROM:<a@example.org>")
            replies += [smtp.cmd("RCPT <user@mx.test>"), smtp.cmd("RCPT TO:<x@y@mx.test>")]
            smtp.cmd(f"RCPT TO:{RCPT}")
            replies.append(smtp.cmd("DATA now"))
            return replies, smtp.code("DATA"), smtp.message(b"s: x\r\n").code

    replies, data, stored = await in_thread(client)
    assert [r.code for r in replies] == [501] * 9, replies
    assert all(r.last.startswith("5.") for r in replies), replies
    assert (data, stored) == (354, 250)
    assert len(server.messages()) == 1


@pytest_twisted.ensureDeferred
async def test_unknown_mail_and_rcpt_parameters_get_555(server):
    def client():
        with ehlo(server) as smtp:
            mail = smtp.cmd("MAIL FROM:<a@example.org> FROB=1")
            smtp.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME")
            rcpt = smtp.cmd(f"RCPT TO:{RCPT} XFROB=NEVER")
            return mail, rcpt, smtp.code(f"RCPT TO:{RCPT}")

    mail, rcpt, accepted = await in_thread(client)
    assert (mail.code, mail.last) == (555, "5.5.4 Unsupported option: FROB")
    assert (rcpt.code, rcpt.last) == (555, "5.5.4 Unsupported option: XFROB")
    assert accepted == 250


@pytest_twisted.ensureDeferred
async def test_mail_parameters_after_helo_get_555(server):
    def client():
        with Client(server.address) as smtp:
            smtp.cmd("HELO client.test")
            refused = smtp.cmd("MAIL FROM:<a@example.org> SIZE=10")
            return refused, smtp.code("MAIL FROM:<a@example.org>")

    refused, plain = await in_thread(client)
    assert (refused.code, refused.last.split()[0]) == (555, "5.5.4")
    assert plain == 250


@pytest_twisted.ensureDeferred
async def test_unknown_command_gets_500(server):
    def client():
        with ehlo(server) as smtp:
            return smtp.cmd("FROB x"), smtp.cmd("X-Y"), smtp.code("NOOP")

    first, second, noop = await in_thread(client)
    assert (first.code, second.code, noop) == (500, 500, 250)
    assert first.last.startswith("5.5.1 ")


@pytest_twisted.ensureDeferred
async def test_count_unrecognized_commands_disconnects_with_521(qpconn_server):
    server = qpconn_server(plugins=["count_unrecognized_commands 2"])

    def client():
        with ehlo(server) as smtp:
            return smtp.cmd("FROB"), smtp.cmd("FROB"), smtp.is_closed()

    first, second, closed = await in_thread(client)
    assert first.code == 500
    assert second.code == 521
    assert closed


@pytest_twisted.ensureDeferred
async def test_nul_bare_lf_and_non_ascii_in_a_command_get_500(server):
    def client():
        with ehlo(server) as smtp:
            nul = smtp.cmd(b"NOOP a\0b")
            smtp.send(b"NOOP bare\n")
            bare_lf = smtp.reply()
            non_ascii = smtp.cmd("NOOP caf\u00e9".encode())
            return nul, bare_lf, non_ascii, smtp.code("NOOP")

    nul, bare_lf, non_ascii, noop = await in_thread(client)
    assert (nul.code, nul.last) == (500, "5.5.2 NUL character in command")
    assert bare_lf.code == 500
    assert non_ascii.code == 500
    assert noop == 250


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\n.\r", b"\n.\r", b"\r.\r\n"],
    ids=repr,
)
@pytest_twisted.ensureDeferred
async def test_only_crlf_dot_crlf_ends_data_and_smuggled_ends_are_refused(server, fake_end):
    smuggled = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\n"

    def client():
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.cmd(f"RCPT TO:{RCPT}")
            smtp.cmd("DATA")
            smtp.send(b"s: x\r\n\r\nbefore" + fake_end + smuggled + b"evil body\r\n.\r\n")
            # Exactly one reply for the whole text: nothing was read as a command.
            return smtp.reply(), smtp.code("NOOP")

    reply, noop = await in_thread(client)
    assert (reply.code, reply.last.split()[0]) == (554, "5.5.2")
    assert noop == 250
    assert server.messages() == []


@pytest_twisted.ensureDeferred
async def test_unwritable_maildir_gives_451_and_stores_nothing(qpconn_server, tmp_path, errors):
    maildir = tmp_path / "box" / "maildir"
    server = qpconn_server(plugins=["relay", "rcpt_ok", f"queue/maildir {maildir}"])
    # The Maildir existed at start-up; now its parent is a regular file (root ignores
    # permissions, so chmod would not stop the write).
    shutil.rmtree(tmp_path / "box")
    (tmp_path / "box").write_bytes(b"not a directory")

    def client():
        with ehlo(server) as smtp:
            reply = smtp.transaction("<a@example.org>", [RCPT], b"s: x\r\n\r\nlost")
            return reply, smtp.code("NOOP")

    reply, noop = await in_thread(client)
    assert (reply.code, reply.last.split()[0]) == (451, "4.3.0")
    assert noop == 250
    assert not os.path.exists(maildir / "new")
    (logged,) = errors
    assert "maildir delivery failed" in describe(logged)
    errors.clear()
