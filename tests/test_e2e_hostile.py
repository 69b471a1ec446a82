"""End-to-end: hostile input the other test modules do not cover.

A bare CR inside a command, a 100 KB command, thousands of pipelined garbage lines, and
clients that vanish mid-command or mid-DATA while another client delivers: the server
answers what it should, releases what the session held (sessions, connection slots,
spool files) and keeps serving everyone else.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from tests.e2e_client import Client, ehlo, watch_errors
from tests.support.server import in_thread
from tests.support.timing import wait_until

RCPT = "<user@mx.test>"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest_twisted.ensureDeferred
async def test_bare_cr_inside_a_command_gets_500_and_is_not_a_line_end(server):
    def client() -> tuple[Any, Any, int]:
        with ehlo(server) as smtp:
            # Were CR a line end, RSET would be a command of its own and get a 250 too.
            bare = smtp.cmd(b"NOOP\rRSET")
            mail = smtp.cmd(b"MAIL FROM:<a@example.org>\rRCPT TO:<user@mx.test>")
            return bare, mail, smtp.code("NOOP")

    bare, mail, noop = await in_thread(client)
    assert (bare.code, bare.last) == (500, "5.5.2 Bare CR in command")
    assert (mail.code, mail.last) == (500, "5.5.2 Bare CR in command")
    assert noop == 250


@pytest_twisted.ensureDeferred
async def test_a_100_kb_command_gets_one_500_and_the_session_stays_in_step(server):
    def client() -> list[Any]:
        with ehlo(server) as smtp:
            smtp.send(b"MAIL FROM:<" + b"a" * 100_000 + b"@example.org>\r\nNOOP\r\n")
            return [smtp.reply(), smtp.reply(), smtp.cmd("MAIL FROM:<a@example.org>")]

    long_line, noop, mail = await in_thread(client)
    assert (long_line.code, long_line.last) == (500, "5.5.2 Line too long")
    assert noop.code == 250
    assert mail.code == 250


@pytest_twisted.ensureDeferred
async def test_thousands_of_pipelined_garbage_lines_each_get_500_in_order(qpconn_server):
    server = qpconn_server(files={"max_errors": "0"})
    count = 3000

    def client() -> tuple[list[int], Any]:
        with ehlo(server) as smtp:
            garbage = b"".join(b"GARBAGE %d \x01\x7f junk\r\n" % n for n in range(count))
            smtp.send(garbage + b"NOOP last\r\n")
            codes = [smtp.reply().code for _ in range(count)]
            return codes, smtp.reply()

    codes, last = await in_thread(client)
    assert codes == [500] * count
    assert last.code == 250


@pytest_twisted.ensureDeferred
async def test_pipelined_garbage_past_max_errors_is_cut_off_with_421(server):
    def client() -> tuple[list[int], bool]:
        with ehlo(server) as smtp:
            smtp.send(b"".join(b"\x00\xffjunk %d\r\n" % n for n in range(5000)))
            codes = []
            for _ in range(5000):
                reply = smtp.reply()
                codes.append(reply.code)
                if reply.code == 421:
                    break
            return codes, smtp.is_closed()

    codes, closed = await in_thread(client)
    assert codes == [500] * 20 + [421]
    assert closed


@pytest_twisted.ensureDeferred
async def test_clients_vanishing_mid_command_and_mid_data_free_everything(
    qpconn_server, tmp_path
):
    spool = tmp_path / "spool"
    spool.mkdir()
    server = qpconn_server(
        files={
            "spool_dir": str(spool),
            "size_threshold": "1000",
            "max_connections": "50",
        }
    )

    def vanish_mid_command() -> None:
        with ehlo(server) as smtp:
            smtp.send(b"MAIL FROM:<half@exa")

    def vanish_mid_data() -> bool:
        with ehlo(server) as smtp:
            assert smtp.code("MAIL FROM:<a@example.org>") == 250
            assert smtp.code(f"RCPT TO:{RCPT}") == 250
            assert smtp.code("DATA") == 354
            smtp.send(b"Subject: cut\r\n\r\n" + b"x" * 70 + b"\r\n")
            smtp.send((b"y" * 998 + b"\r\n") * 200)
            # Wait (bounded) until the server has read past size_threshold and spooled.
            spooled = wait_until(lambda: os.listdir(spool)) and len(os.listdir(spool)) == 1
            # RST rather than FIN: the rudest way to go.
            smtp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return spooled

    def deliver() -> int:
        with ehlo(server) as smtp:
            return smtp.transaction("<a@example.org>", [RCPT], b"Subject: ok\r\n\r\nfine").code

    results = []
    for _ in range(5):
        await in_thread(vanish_mid_command)
        results.append(await in_thread(vanish_mid_data))
        assert await in_thread(deliver) == 250
    await server.wait_sessions_closed()
    assert not server.factory.sessions
    assert server.factory.connection_counter.total == 0
    assert os.listdir(spool) == []
    messages = server.messages()
    assert len(messages) == 5
    assert all(b"Subject: ok" in m for m in messages)
    assert results == [True] * 5  # each cut message had been spooled, and was removed

    def still_serving() -> int:
        with Client(server.address) as smtp:
            return smtp.code("EHLO client.test")

    assert await in_thread(still_serving) == 250
