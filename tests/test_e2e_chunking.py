"""End-to-end: CHUNKING and BINARYMIME (RFC 3030) with raw sockets and smtplib.

BDAT octets are stored exactly as sent; each chunk gets one reply, in order even when
pipelined; the same data/data_post/queue hooks see the same Transaction as with DATA;
databytes spans chunks; DATA and BDAT do not mix; a wrong or malformed size never lets
chunk octets be read as commands.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.hooks.results import DENY
from qpconn.plugins import Plugin
from tests.e2e_client import Client, ehlo, plugin_of, split_message, watch_errors
from tests.support.server import in_thread

MESSAGE = b"Subject: chunks\r\nFrom: a@example.org\r\n\r\nline one\r\n.dot\r\n"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


class Watch(Plugin):
    """Records which transaction each message hook saw and its body; may refuse data."""

    refuse_data = False

    def register(self) -> None:
        self.seen: list[tuple[str, int, bytes]] = []

    def _note(self, hook: str, txn: Any) -> None:
        self.seen.append((hook, id(txn), txn.body_bytes() if txn.header else b""))

    def hook_data(self, transaction: Any) -> Any:
        self._note("data", transaction)
        return (DENY, "5.7.1 no data today") if self.refuse_data else None

    def hook_data_post(self, transaction: Any) -> Any:
        self._note("data_post", transaction)

    def hook_queue_pre(self, transaction: Any) -> Any:
        self._note("queue_pre", transaction)


def start(qpconn_server: Any, **files: Any) -> Any:
    return qpconn_server(
        plugins=[Watch, "relay", "rcpt_ok", "queue/maildir maildir"], files=files or None
    )


def envelope(smtp: Client) -> None:
    assert smtp.cmd("MAIL FROM:<a@example.org>").code == 250
    assert smtp.cmd("RCPT TO:<u@mx.test>").code == 250


@pytest_twisted.ensureDeferred
async def test_chunks_are_stored_raw_and_see_the_same_hooks_as_data(qpconn_server, tmp_path):
    # line_endings=crlf: the Maildir keeps the octets as received, so "raw" can be seen
    raw = "queue/maildir maildir line_endings=crlf"
    server = qpconn_server(plugins=[Watch, "relay", "rcpt_ok", raw])
    first, second = MESSAGE[:20], MESSAGE[20:] + b"bare\nlf and \r\n.\r\n no end marker\r\n"

    def raw_client():
        with ehlo(server) as smtp:
            envelope(smtp)
            smtp.send(b"BDAT %d\r\n" % len(first) + first)
            one = smtp.reply()
            smtp.send(b"BDAT %d LAST\r\n" % len(second) + second)
            two = smtp.reply()
            return one, two, smtp.code("NOOP")

    one, two, noop = await in_thread(raw_client)
    assert (one.code, one.last) == (250, f"2.0.0 {len(first)} octets received")
    assert two.code == 250 and "Queued as" in two.last
    assert noop == 250
    (stored,) = (tmp_path / "maildir" / "new").iterdir()
    fields, body = split_message(stored.read_bytes(), b"\r\n")
    assert b"with ESMTP id" in b" ".join(f for f in fields if f.startswith(b"Received:"))
    # Stored exactly as sent: no unstuffing, the bare LF and the "." line kept.
    assert body == (first + second).partition(b"\r\n\r\n")[2]
    watch = plugin_of(server, Watch)
    hooks = [hook for hook, _, _ in watch.seen]
    assert hooks == ["data", "data_post", "queue_pre"]
    assert len({txn for _, txn, _ in watch.seen}) == 1
    assert watch.seen[1][2] == body


@pytest_twisted.ensureDeferred
async def test_smtplib_send_and_docmd(qpconn_server, tmp_path):
    server = start(qpconn_server)

    def client():
        with smtplib.SMTP(*server.address, timeout=5) as smtp:
            smtp.ehlo("client.test")
            offered = smtp.has_extn("chunking"), smtp.has_extn("binarymime")
            smtp.mail("a@example.org", ["BODY=BINARYMIME"])
            smtp.rcpt("u@mx.test")
            body = MESSAGE + bytes(range(256))  # binary: NUL, bare CR, 8-bit
            smtp.send(b"BDAT %d LAST\r\n" % len(body) + body)
            return offered, smtp.getreply(), body

    offered, (code, text), body = await in_thread(client)
    assert offered == (True, True)
    assert code == 250, text
    (stored,) = (tmp_path / "maildir" / "new").iterdir()
    assert stored.read_bytes().endswith(bytes(range(256)))
    assert body.endswith(bytes(range(256)))


@pytest_twisted.ensureDeferred
async def test_pipelined_chunks_are_answered_in_order(qpconn_server, tmp_path):
    server = start(qpconn_server)
    pieces = [MESSAGE[:7], MESSAGE[7:30], MESSAGE[30:]]

    def client():
        with ehlo(server) as smtp:
            payload = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\n"
            for index, piece in enumerate(pieces):
                last = b" LAST" if index == len(pieces) - 1 else b""
                payload += b"BDAT %d%s\r\n" % (len(piece), last) + piece
            smtp.send(payload + b"NOOP\r\nQUIT\r\n")
            return smtp.replies(7), smtp.is_closed()

    replies, closed = await in_thread(client)
    assert [r.code for r in replies] == [250, 250, 250, 250, 250, 250, 221]
    assert [r.last for r in replies[2:4]] == ["2.0.0 7 octets received", "2.0.0 23 octets received"]
    assert "Queued as" in replies[4].last
    assert closed
    (stored,) = (tmp_path / "maildir" / "new").iterdir()
    # stored with LF line endings, as Maildir readers expect
    assert split_message(stored.read_bytes())[1] == b"line one\n.dot\n"


@pytest_twisted.ensureDeferred
async def test_databytes_spans_chunks(qpconn_server, tmp_path):
    server = start(qpconn_server, databytes="60")

    def client():
        with ehlo(server) as smtp:
            envelope(smtp)
            smtp.send(b"BDAT 40\r\n" + b"x" * 40)
            first = smtp.reply()
            smtp.send(b"BDAT 40\r\n" + b"y" * 40 + b"BDAT 5 LAST\r\nzzzzz")
            return first, smtp.replies(2), smtp.code("NOOP")

    first, (over, after), noop = await in_thread(client)
    assert first.code == 250
    assert (over.code, over.last) == (552, "5.3.4 Message too big")
    assert after.code == 503  # the transaction ended with the refused chunk
    assert noop == 250
    assert not (tmp_path / "maildir" / "new").exists() or not list(
        (tmp_path / "maildir" / "new").iterdir()
    )


@pytest_twisted.ensureDeferred
async def test_data_and_bdat_do_not_mix(qpconn_server):
    server = start(qpconn_server)

    def client():
        with ehlo(server) as smtp:
            envelope(smtp)
            smtp.send(b"BDAT 3\r\nabc")
            chunk = smtp.reply()
            data = smtp.cmd("DATA")
            rcpt = smtp.cmd("RCPT TO:<v@mx.test>")
            rset = smtp.cmd("RSET")
            # BINARYMIME must use BDAT.
            assert smtp.cmd("MAIL FROM:<a@example.org> BODY=BINARYMIME").code == 250
            assert smtp.cmd("RCPT TO:<u@mx.test>").code == 250
            binary_data = smtp.cmd("DATA")
            return chunk, data, rcpt, rset, binary_data

    chunk, data, rcpt, rset, binary_data = await in_thread(client)
    assert chunk.code == 250
    assert (data.code, rcpt.code, rset.code) == (503, 503, 250)
    assert binary_data.code == 503
    assert binary_data.last == "5.5.1 Error: BODY=BINARYMIME requires BDAT"


@pytest_twisted.ensureDeferred
async def test_data_hook_refusal_is_the_chunk_reply(qpconn_server):
    server = start(qpconn_server)
    plugin_of(server, Watch).refuse_data = True

    def client():
        with ehlo(server) as smtp:
            envelope(smtp)
            smtp.send(b"BDAT 5\r\nQUIT\nBDAT 4 LAST\r\nRSET")
            return smtp.replies(2), smtp.code("NOOP")

    (first, second), noop = await in_thread(client)
    assert (first.code, first.last) == (554, "5.7.1 no data today")
    assert second.code == 503
    assert noop == 250
    assert server.messages() == []


@pytest_twisted.ensureDeferred
async def test_fewer_octets_than_announced_then_quit_or_close(qpconn_server):
    """A short chunk: the QUIT is part of the chunk, so it is never obeyed; a close
    before the chunk is complete stores nothing."""
    server = start(qpconn_server)

    def client():
        with ehlo(server) as smtp:
            envelope(smtp)
            smtp.send(b"BDAT 100 LAST\r\nshort\r\nQUIT\r\n")
            smtp.sock.settimeout(0.5)
            try:
                got = smtp.sock.recv(100)
            except TimeoutError:
                got = b""
            return got

    assert await in_thread(client) == b""  # no 221: QUIT was chunk data
    await server.wait_sessions_closed()
    assert server.messages() == []


@pytest_twisted.ensureDeferred
async def test_non_numeric_size_is_501_and_closes(qpconn_server):
    server = start(qpconn_server)

    def client():
        with ehlo(server) as smtp:
            envelope(smtp)
            reply = smtp.cmd(b"BDAT ten LAST\r\nRSET")
            return reply, smtp.is_closed()

    reply, closed = await in_thread(client)
    assert (reply.code, reply.last) == (501, "5.5.4 Syntax: BDAT count [LAST]")
    assert closed
    assert server.messages() == []


@pytest_twisted.ensureDeferred
async def test_bdat_before_rcpt_skips_the_octets(qpconn_server):
    server = start(qpconn_server)

    def client():
        with ehlo(server) as smtp:
            assert smtp.cmd("MAIL FROM:<a@example.org>").code == 250
            smtp.send(b"BDAT 6 LAST\r\nRSET\r\nNOOP\r\n")
            return smtp.replies(2)

    refused, noop = await in_thread(client)
    assert (refused.code, refused.last) == (503, "5.5.1 Error: need RCPT command")
    assert noop.code == 250 and noop.last == "2.0.0 OK"
