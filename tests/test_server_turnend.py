"""The end of a reactor turn: work left for it (fastpath.turnend) and the replies held to it.

``at_turn_end`` runs the calls of one turn after it, in order, with one ``callLater(0)`` for
all of them; a failing call is logged and keeps no other from running; a call made while
they run waits for the next turn.

With more than one session open the server sends the replies of one reactor turn
together at its end (qpconn.server.output.ReplyWriter.flush). Whatever a session writes at
once -- a closing 221, the 220 before a TLS handshake, the replies owed to a client that half-closed
-- must not overtake or lose replies held earlier in the same turn. Each of those tests
keeps a second session open so that the held path is the one taken.
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from qpconn.hooks.results import OK
from qpconn.plugins import Plugin
from qpconn.server.fastpath.turnend import at_turn_end
from tests.e2e_client import Client, ehlo, maildir_line, watch_errors
from tests.support.server import in_thread, read_replies, reply_codes
from tests.support.timing import wait_until

MSG = b"Subject: held\r\n\r\nbody\r\n"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


# -- at_turn_end itself ----------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_calls_run_once_after_the_turn_in_order_with_one_delayed_call(errors):
    done: list[str] = []
    before = len(reactor.getDelayedCalls())
    at_turn_end(lambda: done.append("a"))
    at_turn_end(lambda: done.append("b"))
    assert len(reactor.getDelayedCalls()) == before + 1  # one for the whole turn
    assert done == []  # not before the turn ends

    def broken() -> None:
        done.append("c")
        raise RuntimeError("one of them fails")

    at_turn_end(broken)
    at_turn_end(lambda: done.append("d"))
    assert await in_thread(wait_until, lambda: len(done) == 4)
    assert done == ["a", "b", "c", "d"]  # the failure kept no other call from running
    assert [e["log_format"] for e in errors] == ["end-of-turn call {function!r} failed"]
    errors.clear()


@pytest_twisted.ensureDeferred
async def test_a_call_made_while_they_run_waits_for_the_next_turn():
    done: list[str] = []

    def first() -> None:
        done.append("first")
        at_turn_end(lambda: done.append("later"))
        assert done == ["first"]  # not run inside this pass

    at_turn_end(first)
    assert await in_thread(wait_until, lambda: len(done) == 2)
    assert done == ["first", "later"]


# -- replies held to the end of the turn ------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_pipelined_replies_then_quit_all_arrive_in_order(server):
    def client() -> tuple[list[int], bool]:
        with Client(server.address) as other, ehlo(server) as smtp:
            assert other.greeting.code == 220
            smtp.send(
                b"NOOP\r\nRSET\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\nQUIT\r\n"
            )
            codes = [reply.code for reply in smtp.replies(5)]
            return codes, smtp.is_closed()

    codes, closed = await in_thread(client)
    assert codes == [250, 250, 250, 250, 221]
    assert closed


class NextTurnRcpt(Plugin):
    """rcpt: accepted on the reactor's next turn, before that turn's held replies go out."""

    def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> Any:
        return task.deferLater(reactor, 0, lambda: OK)


@pytest_twisted.ensureDeferred
async def test_a_closing_reply_never_overtakes_a_reply_held_in_an_earlier_drive(
    qpconn_server, tmp_path
):
    # MAIL is answered (and held) in one turn; RCPT's hook answers early in the next,
    # which runs QUIT: its 221 is written at once and must come after the held 250.
    server = qpconn_server(plugins=[NextTurnRcpt, maildir_line(tmp_path / "maildir")])

    def client() -> tuple[list[int], bool]:
        with Client(server.address) as other, ehlo(server) as smtp:
            assert other.greeting.code == 220
            results = []
            for _ in range(5):
                smtp.send(b"RSET\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\n")
                results += [reply.code for reply in smtp.replies(3)]
            smtp.send(b"RSET\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\nQUIT\r\n")
            results += [reply.code for reply in smtp.replies(4)]
            return results, smtp.is_closed()

    codes, closed = await in_thread(client)
    assert codes == [250, 250, 250] * 5 + [250, 250, 250, 221]
    assert closed


@pytest_twisted.ensureDeferred
async def test_half_closed_client_gets_every_reply_before_the_close(server):
    def client() -> bytes:
        with Client(server.address) as other:
            assert other.greeting.code == 220
            with socket.create_connection(server.address, timeout=5) as sock:
                payload = (
                    b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\n"
                    b"DATA\r\n" + MSG + b".\r\n"
                )
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                return read_replies(sock, None)  # until the server closes

    data = await in_thread(client)
    assert reply_codes(data) == [220, 250, 250, 250, 354, 250]
    assert len(server.messages()) == 1


@pytest_twisted.ensureDeferred
async def test_starttls_while_other_sessions_are_open(qpconn_server, pki):
    server = qpconn_server(files={"tls_cert": pki.cert, "tls_key": pki.key})

    def client() -> str:
        with Client(server.address) as other:
            assert other.greeting.code == 220
            with smtplib.SMTP(*server.address, timeout=5) as smtp:
                smtp.ehlo("client.test")
                smtp.starttls(context=pki.client_context())
                smtp.ehlo("client.test")
                smtp.sendmail("a@example.org", ["user@mx.test"], MSG)
                return str(smtp.sock.version())

    version = await in_thread(client)
    assert version.startswith("TLS")
    assert len(server.messages()) == 1


@pytest_twisted.ensureDeferred
async def test_many_sessions_at_once_each_get_their_own_replies(server):
    count = 12

    def one(index: int) -> list[str]:
        with Client(server.address) as smtp:
            smtp.cmd(f"EHLO c{index}.test")
            lines = []
            for turn in range(3):
                rcpt = f"<u{index}x{turn}@mx.test>"
                assert smtp.code("MAIL FROM:<a@example.org>") == 250
                lines.append(smtp.cmd(f"RCPT TO:{rcpt}").last)  # names this session's address
                assert smtp.code("DATA") == 354
                assert smtp.message(MSG).code == 250
            smtp.cmd("QUIT")
            return lines

    def client() -> list[list[str]]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(one, range(count)))

    results = await in_thread(client)
    assert len(results) == count
    for index, lines in enumerate(results):
        assert lines == [f"2.1.5 <u{index}x{turn}@mx.test>, recipient ok" for turn in range(3)]
    assert len(server.messages()) == count * 3
