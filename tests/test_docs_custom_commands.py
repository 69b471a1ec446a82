"""docs/examples/custom_commands.py through a real server, as docs/protocol.md shows it."""

from __future__ import annotations

import re
import smtplib
import socket
from pathlib import Path

import pytest_twisted

from docs.examples.custom_commands import StatsCommands
from qpconn import DENY
from qpconn.plugins import Plugin
from tests.support.server import in_thread, raw_session, read_replies, reply_codes

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


class RefuseBlocked(Plugin):
    """Refuses one recipient, so that a refused RCPT is seen not to count."""

    def hook_rcpt(self, transaction, recipient, params):
        if recipient.user == "blocked":
            return DENY, "5.1.1 no such user"
        return None


def start(qpconn_server, tmp_path):
    maildir = tmp_path / "maildir"
    return qpconn_server(
        plugins=[RefuseBlocked, "rcpt_ok", f"queue/maildir {maildir}"], commands=StatsCommands
    )


@pytest_twisted.ensureDeferred
async def test_greeting_ehlo_keyword_and_xstats_count_this_session(qpconn_server, tmp_path):
    server = start(qpconn_server, tmp_path)

    def client():
        with smtplib.SMTP(timeout=10) as smtp:
            greeting = smtp.connect(*server.address)
            smtp.ehlo("client.test")
            advertised = smtp.has_extn("xstats")
            before = smtp.docmd("XSTATS")
            refused = smtp.sendmail(
                "a@example.org", ["one@mx.test", "two@mx.test", "blocked@mx.test"], b"\r\nhi\r\n"
            )
            smtp.sendmail("a@example.org", ["three@mx.test"], b"Subject: 2\r\n\r\nhi\r\n")
            after = smtp.docmd("XSTATS")
            bad = smtp.docmd("XSTATS", "now")
            return greeting, advertised, before, refused, after, bad

    greeting, advertised, before, refused, after, bad = await in_thread(client)
    assert greeting == (220, b"mx.test ESMTP Example Mail Service; no unsolicited mail")
    assert advertised
    assert before[0] == 250
    assert before[1].endswith(b"\n2.0.0 recipients accepted: 0\n2.0.0 messages accepted: 0")
    assert refused == {"blocked@mx.test": (550, b"5.1.1 no such user")}
    assert after[0] == 250
    assert after[1].endswith(b"\n2.0.0 recipients accepted: 3\n2.0.0 messages accepted: 2")
    assert bad == (501, b"5.5.4 Syntax: XSTATS")
    assert len(server.messages()) == 2


@pytest_twisted.ensureDeferred
async def test_counts_are_per_connection_and_quit_reports_them(qpconn_server, tmp_path):
    server = start(qpconn_server, tmp_path)
    payload = (
        b"EHLO a.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n"
        b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )
    first = await in_thread(raw_session, server.address, payload)
    assert first.endswith(b"221 2.0.0 1 message(s) accepted, bye\r\n")

    second = await in_thread(raw_session, server.address, b"XSTATS\r\nQUIT\r\n")
    assert b"250-2.0.0 session " in second
    assert b"250-2.0.0 recipients accepted: 0\r\n250 2.0.0 messages accepted: 0\r\n" in second
    assert second.endswith(b"221 2.0.0 0 message(s) accepted, bye\r\n")


@pytest_twisted.ensureDeferred
async def test_expn_gets_502_and_other_unknown_verbs_still_reach_the_hook(qpconn_server, tmp_path):
    server = start(qpconn_server, tmp_path)
    data = await in_thread(raw_session, server.address, b"EXPN staff\r\nXYZZY\r\nQUIT\r\n")
    assert b"502 5.5.1 EXPN is not implemented\r\n" in data
    assert b"500 5.5.1 Unrecognized command\r\n" in data
    assert reply_codes(data) == [220, 502, 500, 221]


@pytest_twisted.ensureDeferred
async def test_http_request_is_refused_and_the_connection_closed(qpconn_server, tmp_path):
    server = start(qpconn_server, tmp_path)
    request = b"GET / HTTP/1.1\r\nHost: mx.test\r\n\r\n"
    data = await in_thread(raw_session, server.address, request)
    lines = data.split(b"\r\n")
    assert lines[0].startswith(b"220 ")
    # One reply, then the server closed: the Host line was never answered.
    assert lines[1:] == [b"554 5.7.0 This is an SMTP server, not a web server", b""]


def transcript() -> list[tuple[str, list[str]]]:
    """docs/protocol.md's session: each client line with the server lines that follow it
    (the greeting comes first, under an empty client line)."""
    text = DOC.read_text(encoding="utf-8")
    block = text[text.index("```\nS: 220 ") + 4 :]
    block = block[: block.index("```")]
    steps: list[tuple[str, list[str]]] = [("", [])]
    for line in block.splitlines():
        if line.startswith("C: "):
            steps.append((line[3:], []))
        else:
            assert line.startswith("S: "), line
            steps[-1][1].append(line[3:])
    return steps


def play(address: tuple[str, int], steps: list[tuple[str, list[str]]]) -> list[str]:
    """Send each client line (``(message) .`` is a message and its dot) and read as many
    replies as the transcript shows for it: the server's lines, in order."""
    with socket.create_connection(address, timeout=10) as sock:
        answered = b""
        for command, shown in steps:
            if command == "(message) .":
                sock.sendall(b"Subject: transcript\r\n\r\nhello\r\n.\r\n")
            elif command:
                sock.sendall(command.encode() + b"\r\n")
            replies = sum(1 for line in shown if line[3:4] == " ")
            answered += read_replies(sock, replies)
    return answered.decode().splitlines()


def without_ids(lines: list[str]) -> list[str]:
    return [re.sub(r"\b[0-9a-f]{16}\b", "<id>", line) for line in lines]


@pytest_twisted.ensureDeferred
async def test_the_documented_transcript_is_what_the_server_says(qpconn_server, tmp_path):
    server = start(qpconn_server, tmp_path)
    steps = transcript()
    assert [command for command, _ in steps][1:] == [
        "EHLO client.example", "MAIL FROM:<a@example.org>", "RCPT TO:<u@mx.test>", "DATA",
        "(message) .", "XSTATS", "EXPN staff", "QUIT"]  # fmt: skip
    said = await in_thread(play, server.address, steps)
    assert without_ids(said) == without_ids([line for _, shown in steps for line in shown])
