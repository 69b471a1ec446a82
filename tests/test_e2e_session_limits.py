"""End-to-end: the per-message, per-session and per-server limits of ``qpconn.smtp.limits``.

``max_rcpt`` (452 4.5.3), ``data_timeout`` and the idle ``timeout`` in each phase
(421 4.4.2), ``max_errors`` (421 4.7.0), ``max_connections`` and
``max_connections_per_ip`` (421 4.7.0 before any hook), and ``bare_newline normalize``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config, ConfigError
from qpconn.plugins import Plugin
from qpconn.server.factory import SMTPFactory
from qpconn.server.peerinfo import LookupSettings
from qpconn.smtp.limits import SessionLimits
from tests.e2e_client import Client, ehlo, split_message, watch_errors
from tests.support.server import in_thread, read_replies
from tests.support.timing import (
    assert_data_timed_out,
    assert_within_timeout,
    timed_reply,
    wait_until,
)
from tests.test_docs_reference import settings_table, ticked

RCPT = "<user@mx.test>"
#: a Maildir that keeps the octets as received (CRLF): what normalisation did stays visible
#: (stored with LF, a bare LF left alone and a normalised one would look the same)
CRLF_MAILDIR = ["relay", "rcpt_ok", "queue/maildir maildir line_endings=crlf"]


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


def first_word(reply: Any) -> tuple[int, str]:
    return reply.code, reply.last.split()[0]


# -- max_rcpt -----------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_the_101st_recipient_gets_452_and_the_first_100_get_the_message(server):
    def client() -> tuple[list[int], Any, Any]:
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            # Pipelined, as a bulk sender would: one write, then every reply.
            smtp.send("".join(f"RCPT TO:<u{n}@mx.test>\r\n" for n in range(101)))
            replies = smtp.replies(101)
            extra = smtp.cmd("RCPT TO:<late@mx.test>")
            assert smtp.code("DATA") == 354
            return [r.code for r in replies[:100]], (replies[100], extra), smtp.message(b"s: x")

    accepted, (hundred_first, extra), end = await in_thread(client)
    assert accepted == [250] * 100
    assert first_word(hundred_first) == (452, "4.5.3")
    assert hundred_first.last == "4.5.3 Too many recipients"
    assert first_word(extra) == (452, "4.5.3")
    assert end.code == 250
    (message,) = server.messages()
    delivered = [f for f in split_message(message)[0] if f.startswith(b"Delivered-To:")]
    assert len(delivered) == 100


@pytest_twisted.ensureDeferred
async def test_max_rcpt_counts_accepted_recipients_and_starts_again_per_transaction(
    qpconn_server,
):
    server = qpconn_server(files={"max_rcpt": "2"})

    def client() -> list[int]:
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            codes = [smtp.code(f"RCPT TO:{r}") for r in ("<x@elsewhere.example>", RCPT, RCPT)]
            codes.append(smtp.code("RCPT TO:<third@mx.test>"))
            codes.append(smtp.code("RSET"))
            smtp.cmd("MAIL FROM:<a@example.org>")
            codes.append(smtp.code(f"RCPT TO:{RCPT}"))
            return codes

    # A refused recipient takes no place; after RSET the count starts again.
    assert await in_thread(client) == [550, 250, 250, 452, 250, 250]


@pytest_twisted.ensureDeferred
async def test_max_rcpt_zero_means_no_limit(qpconn_server):
    server = qpconn_server(files={"max_rcpt": "0"})

    def client() -> list[int]:
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.send("".join(f"RCPT TO:<u{n}@mx.test>\r\n" for n in range(150)))
            return [r.code for r in smtp.replies(150)]

    assert await in_thread(client) == [250] * 150


# -- timeouts -----------------------------------------------------------------------------
def stall_in_data(server: Any, text: bytes, stall: float) -> tuple[Any, float, bool]:
    with ehlo(server) as smtp:
        smtp.cmd("MAIL FROM:<a@example.org>")
        smtp.cmd(f"RCPT TO:{RCPT}")
        assert smtp.code("DATA") == 354
        smtp.send(text)
        return timed_reply(smtp, stall)


@pytest_twisted.ensureDeferred
async def test_client_stalling_mid_data_gets_421_after_data_timeout(qpconn_server):
    server = qpconn_server(files={"timeout": "30", "data_timeout": "0.3"})
    outcome = await in_thread(stall_in_data, server, b"s: x\r\n\r\nhalf a", 30.0)
    # 0.3 s, not the 30 s idle timeout
    await assert_data_timed_out(server, outcome, fired=0.3, instead_of=30)


@pytest_twisted.ensureDeferred
async def test_data_timeout_defaults_to_the_idle_timeout(qpconn_server):
    server = qpconn_server(files={"timeout": "0.3"})
    reply, waited, closed = await in_thread(stall_in_data, server, b"s: x\r\n", 30.0)
    assert first_word(reply) == (421, "4.4.2")
    # 0.3 s, where no limit at all would leave the client waiting (here: its 30 s)
    assert_within_timeout(waited, fired=0.3, instead_of=30)
    assert closed


@pytest_twisted.ensureDeferred
async def test_data_timeout_applies_only_to_message_text(qpconn_server):
    # A long DATA timeout and a short idle one: a pause mid-DATA is fine, the same pause
    # between commands is not.
    server = qpconn_server(files={"timeout": "0.4", "data_timeout": "10"})

    def client() -> tuple[Any, Any, float, bool]:
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.cmd(f"RCPT TO:{RCPT}")
            assert smtp.code("DATA") == 354
            smtp.send(b"s: x\r\n\r\nfirst half\r\n")
            time.sleep(0.8)  # the behaviour under test: a pause twice the idle timeout
            stored = smtp.message(b"second half")
            return stored, *timed_reply(smtp, 10.0)

    stored, idle, waited, closed = await in_thread(client)
    assert stored.code == 250
    assert first_word(idle) == (421, "4.4.2")
    assert_within_timeout(waited, fired=0.4, instead_of=10)  # the idle timeout, not DATA's
    assert closed
    assert len(server.messages()) == 1


@pytest_twisted.ensureDeferred
async def test_idle_timeout_in_the_middle_of_a_transaction_gives_421(qpconn_server):
    server = qpconn_server(files={"timeout": "0.3"})

    def client() -> tuple[Any, bool]:
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.cmd(f"RCPT TO:{RCPT}")
            return smtp.reply(), smtp.is_closed()

    reply, closed = await in_thread(client)
    assert first_word(reply) == (421, "4.4.2")
    assert "timeout" in reply.last
    assert closed
    assert server.messages() == []


@pytest_twisted.ensureDeferred
async def test_idle_timeout_before_helo_gives_421(qpconn_server):
    server = qpconn_server(files={"timeout": "0.3"})

    def client() -> tuple[Any, Any, bool]:
        with Client(server.address) as smtp:
            return smtp.greeting, smtp.reply(), smtp.is_closed()

    greeting, reply, closed = await in_thread(client)
    assert greeting.code == 220
    assert first_word(reply) == (421, "4.4.2") and closed


# -- max_errors ---------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_twenty_errors_get_421_and_the_connection_is_closed(server):
    # Errors of every kind count: the core's own 500s and 503s, a plugin's 550.
    bad = [b"NOOP a\0b", b"BOGUS", b"RCPT TO:<x@relay.example>", b"DATA x"]

    def client() -> tuple[list[Any], Any, bool]:
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            replies = [smtp.cmd(bad[n % 4]) for n in range(19)]
            # The 20th: its own reply, then 421 without being asked.
            smtp.send(b"BOGUS\r\n")
            last, closing = smtp.reply(), smtp.reply()
            return [*replies, last], closing, smtp.is_closed()

    replies, closing, closed = await in_thread(client)
    assert all(500 <= r.code < 600 for r in replies), replies
    assert first_word(closing) == (421, "4.7.0")
    assert "Too many errors" in closing.last
    assert closed


@pytest_twisted.ensureDeferred
async def test_pipelined_errors_stop_at_the_limit(qpconn_server):
    server = qpconn_server(files={"max_errors": "5"})

    def client() -> bytes:
        with socket.create_connection(server.address, timeout=10) as sock:
            read_replies(sock, 1)
            sock.sendall(b"BOGUS\r\n" * 50 + b"NOOP\r\n")
            return read_replies(sock, None)  # until the server closes, after its 421

    data = await in_thread(client)
    codes = [line[:3] for line in data.split(b"\r\n") if line]
    assert codes == [b"500"] * 5 + [b"421"]


@pytest_twisted.ensureDeferred
async def test_a_delivered_message_resets_the_error_count(qpconn_server):
    server = qpconn_server(files={"max_errors": "3"})

    def client() -> list[int]:
        with ehlo(server) as smtp:
            codes = [smtp.code("BOGUS"), smtp.code("BOGUS")]
            codes.append(smtp.transaction("<a@example.org>", [RCPT], b"s: x").code)
            codes += [smtp.code("BOGUS"), smtp.code("BOGUS"), smtp.code("NOOP")]
            return codes

    assert await in_thread(client) == [500, 500, 250, 500, 500, 250]


# -- max_connections, max_connections_per_ip ------------------------------------------------
class CountConnect(Plugin):
    """connect: counts the sessions that got as far as the hooks."""

    def register(self) -> None:
        self.count = 0

    def hook_connect(self, transaction: Any) -> None:
        self.count += 1


def refused_at_once(address: tuple[str, int], source: str = "127.0.0.1") -> tuple[bytes, bool]:
    """What a connection over a limit receives, and whether it was then closed."""
    with socket.create_connection(address, timeout=5, source_address=(source, 0)) as sock:
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data, True


@pytest_twisted.ensureDeferred
async def test_connection_over_max_connections_gets_421_and_no_hook_runs(qpconn_server):
    server = qpconn_server(
        files={"max_connections": "2"},
        plugins=[CountConnect, "rcpt_ok", "queue/discard"],
    )
    counter = next(p for p in server.factory.plugins if isinstance(p, CountConnect))

    def client() -> tuple[bytes, list[int], int]:
        first, second = Client(server.address), Client(server.address)
        try:
            refused, _ = refused_at_once(server.address, "127.0.0.3")
            # The slot is free again once a session ends.
            first.cmd("QUIT")
            first.close()
            assert wait_until(lambda: server.factory.connection_counter.total == 1)
            with Client(server.address) as third:
                codes = [second.greeting.code, third.greeting.code, third.code("QUIT")]
        finally:
            second.close()
        return refused, codes, counter.count

    refused, codes, connects = await in_thread(client)
    assert refused.startswith(b"421 4.7.0 mx.test Too many connections")
    assert refused.endswith(b"\r\n") and refused.count(b"\r\n") == 1
    assert codes == [220, 220, 221]
    assert connects == 3  # the refused one never reached a hook
    await server.wait_sessions_closed()
    assert server.factory.connection_counter.total == 0
    assert not server.factory.connection_counter.per_ip


@pytest_twisted.ensureDeferred
async def test_max_connections_per_ip_counts_each_client_address_apart(qpconn_server):
    # an empty exceptions file: the limit applies to loopback too (exempt by default)
    server = qpconn_server(
        files={"max_connections_per_ip": "1", "connection_limit_exceptions": ""}
    )

    def client() -> tuple[int, bytes, int]:
        with Client(server.address) as first:
            refused, _ = refused_at_once(server.address)
            sock = socket.create_connection(server.address, source_address=("127.0.0.2", 0))
            with sock:
                other = read_replies(sock, 1)
            return first.greeting.code, refused, int(other[:3])

    first, refused, other = await in_thread(client)
    assert first == 220
    assert refused.startswith(b"421 4.7.0 mx.test Too many connections from your address")
    assert other == 220


# -- bare_newline normalize ----------------------------------------------------------------
@pytest.mark.parametrize(
    "fake_end", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\n.\r"], ids=repr
)
@pytest_twisted.ensureDeferred
async def test_normalize_stores_bare_newlines_as_crlf_and_never_ends_data_on_them(
    qpconn_server, fake_end
):
    server = qpconn_server(files={"bare_newline": "normalize", "plugins": CRLF_MAILDIR})
    smuggled = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\n"

    def client() -> tuple[Any, int]:
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.cmd(f"RCPT TO:{RCPT}")
            smtp.cmd("DATA")
            smtp.send(b"s: x\r\n\r\nbefore" + fake_end + smuggled + b"body\r\n.\r\n")
            return smtp.reply(), smtp.code("NOOP")

    reply, noop = await in_thread(client)
    assert reply.code == 250 and noop == 250
    (message,) = server.messages()
    body = split_message(message, b"\r\n")[1]
    # One message, the smuggled commands inside it, every line ending in CRLF.
    assert body.count(b"\r\n") == body.count(b"\n") == body.count(b"\r")
    assert body.startswith(b"before\r\n")
    assert body.endswith(smuggled + b"body\r\n")


@pytest_twisted.ensureDeferred
async def test_normalize_reads_bare_lf_lines_as_if_they_ended_in_crlf(qpconn_server):
    server = qpconn_server(files={"bare_newline": "normalize", "plugins": CRLF_MAILDIR})

    def client() -> Any:
        with ehlo(server) as smtp:
            return smtp.transaction(
                "<a@example.org>", [RCPT], b"Subject: lf\nX: y\r\n\nline\n..dot\rcr only\n"
            )

    assert (await in_thread(client)).code == 250
    (message,) = server.messages()
    fields, body = split_message(message, b"\r\n")
    assert b"Subject: lf" in fields and b"X: y" in fields
    assert body == b"line\r\n.dot\r\ncr only\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_reject_is_the_default_and_the_session_stays_usable(server):
    def client() -> tuple[Any, Any]:
        with ehlo(server) as smtp:
            refused = smtp.transaction("<a@example.org>", [RCPT], b"Subject: lf\n\nbody")
            return refused, smtp.transaction("<a@example.org>", [RCPT], b"Subject: ok\r\n\r\nb")

    refused, fine = await in_thread(client)
    assert first_word(refused) == (554, "5.5.2")
    assert fine.code == 250
    assert len(server.messages()) == 1


# -- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("bare_newline", "strip"),
        ("max_rcpt", "-1"),
        ("max_rcpt", "many"),
        ("max_errors", "-5"),
        ("max_connections", "1.5"),
        ("max_connections_per_ip", "-1"),
        ("data_timeout", "-1"),
        ("data_timeout", "soon"),
    ],
)
def test_a_bad_limit_stops_the_server_at_start(tmp_path, name, value):
    (tmp_path / name).write_text(value + "\n")
    with pytest.raises(ConfigError, match=name):
        SMTPFactory(Config(tmp_path), [], lookups=LookupSettings(rdns=False))


def test_documented_defaults_of_the_limits_are_the_effective_ones():
    limits = SessionLimits.from_config(Config(None))
    assert limits == SessionLimits()
    documented = settings_table()
    for name in ("max_rcpt", "max_errors", "max_connections", "max_connections_per_ip"):
        assert ticked(documented[name]) == [str(getattr(limits, name))], name
    assert ticked(documented["bare_newline"]) == ["reject"]
    assert limits.data_timeout is None and "timeout" in documented["data_timeout"]
    assert limits.data_timeout_or(300.0) == 300.0
