"""Backpressure (issue 15, item 2): a client that does not read its replies is not read either.

The protocol is its transport's streaming producer (qpconn.server.protocol, output): once
the replies a client leaves unread fill the socket's bounded send buffer and Twisted's
write buffer, reading stops and what was read is not parsed, so a client pipelining a
burst of NOOPs it never reads the answers to costs one read of input, not the work and
memory of the whole burst; one that has not taken its replies within ``timeout`` is
aborted. Meanwhile other clients are served. Each test runs twice: with the fenced fast
path (replies written straight to the socket, qpconn.server.fastpath.fastwrite) and with
its plain fallback (everything through ``transport.write``), and with a second session
open, so that replies are held to the end of the reactor turn (turnend) as on a busy
server.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from qpconn.server.fastpath import fastwrite
from tests.e2e_client import Client, ehlo, logged_events, watch_errors
from tests.support.server import in_thread

RCPT = "<user@mx.test>"
NOOPS = b"NOOP\r\n" * 400_000  # 2.4 MB: far more than the server may read of it
#: what the server may have read from a client that reads nothing: a read or two of
#: input (Twisted reads 64 KiB at a time); the burst offered is 2.4 MB
READ_BOUND = 256 * 1024
#: a bound for what the server does at once (generous: a shared, loaded machine)
PATIENCE = 30.0


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture(params=["fast path", "plain fallback"])
def write_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways replies reach the socket: direct sends, or Twisted's write() only (what
    fastwrite does when Twisted's internals it reads are not there)."""
    if request.param == "plain fallback":
        monkeypatch.setattr(fastwrite, "_idle", lambda transport: False)
    return str(request.param)


@pytest.fixture
def deadline_events() -> Iterator[list[dict[str, Any]]]:
    with logged_events("deadline") as found:
        yield found


def non_reader(address: tuple[str, int], source: str = "127.0.0.1") -> socket.socket:
    """A connection with a small receive buffer that will never be read from."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.connect(address)
    sock.setblocking(False)
    return sock


def pipeline_until_stalled(socks: list[socket.socket], burst: bytes, stall: float) -> list[int]:
    """Offer ``burst`` on every socket, never reading, until none took a byte for
    ``stall`` seconds (or all of it went): how many bytes each managed to send."""
    sent = [0] * len(socks)
    quiet_since = time.monotonic()
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline and time.monotonic() - quiet_since < stall:
        moved = False
        for index, sock in enumerate(socks):
            if sent[index] >= len(burst):
                continue
            try:
                count = sock.send(burst[sent[index] : sent[index] + 65536])
            except BlockingIOError:
                continue
            sent[index] += count
            moved = True
        if moved:
            quiet_since = time.monotonic()
        else:
            select.select([], socks, [], 0.05)  # until one of them may take more
    return sent


async def until(condition: Any, patience: float = PATIENCE) -> bool:
    """Poll ``condition()`` every 50 ms until true or ``patience`` is over."""
    deadline = time.monotonic() + patience
    while not condition():
        if time.monotonic() > deadline:
            return False
        await task.deferLater(reactor, 0.05, lambda: None)
    return True


def deliver(server: Any, subject: bytes) -> int:
    with ehlo(server) as smtp:
        return smtp.transaction(
            "<a@example.org>", [RCPT], b"Subject: " + subject + b"\r\n\r\nok"
        ).code


def sessions_from(server: Any, port_of: set[int]) -> list[Any]:
    return [p for p in server.factory.sessions if p.commands.connection.remote_port in port_of]


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_is_not_read_and_is_aborted_after_timeout(
    qpconn_server, write_path, deadline_events
):
    server = qpconn_server(files={"timeout": "3"})
    with ExitStack() as held:
        # a second session: replies are held to the end of the turn, as on a busy server
        other = held.enter_context(await in_thread(Client, server.address))
        assert other.greeting.code == 220
        sock = held.enter_context(await in_thread(non_reader, server.address))
        port = sock.getsockname()[1]
        (sent,) = await in_thread(pipeline_until_stalled, [sock], NOOPS, 1.0)
        (attacker,) = sessions_from(server, {port})
        assert await until(lambda: attacker.held)  # paused: its replies are not taken
        # It read one or two reads' worth and stopped; the client's kernel buffers and
        # ours hold the rest, which no one parses.
        assert attacker.bytes_received <= READ_BOUND, attacker.bytes_received
        assert sent > 4 * attacker.bytes_received, (sent, attacker.bytes_received)
        assert attacker.session.buffered <= 64 * 1024
        # Meanwhile a fresh client is served as usual.
        assert await in_thread(deliver, server, b"meanwhile") == 250
        assert not attacker.lost
        # After `timeout` without taking its replies it is aborted, not left to a close
        # that would wait behind them.
        assert await until(lambda: attacker.lost, 3.0 + PATIENCE)
        assert attacker.bytes_received <= READ_BOUND
    assert [(e["limit"], e["reason"]) for e in deadline_events] == [
        ("timeout", "replies not read for 3s")
    ]
    assert len(server.messages()) == 1


#: NOOPs a client that reads nothing may have answered before the server stops: the
#: replies that fit the socket's bounded send buffer (SEND_BUFFER), the client's receive
#: buffer (4 KiB asked, 8 KiB given) and UNSENT_REPLIES_LIMIT in Twisted's, about 20 KiB of
#: 14-octet replies, with a margin. Before both were bounded it was some 8,000.
ANSWERED_BOUND = 3000


@pytest_twisted.ensureDeferred
async def test_a_non_reader_has_only_a_few_thousand_noops_answered(qpconn_server, write_path):
    # What a non-reader costs is the commands parsed and answered before reading stops;
    # the input already read but not parsed costs nothing more.
    server = qpconn_server(files={"timeout": "30"})
    with ExitStack() as held:
        other = held.enter_context(await in_thread(Client, server.address))
        assert other.greeting.code == 220
        sock = held.enter_context(await in_thread(non_reader, server.address))
        port = sock.getsockname()[1]
        await in_thread(pipeline_until_stalled, [sock], NOOPS, 1.0)
        (attacker,) = sessions_from(server, {port})
        assert await until(lambda: attacker.held)
        answered = (attacker.bytes_received - attacker.session.buffered) // len(b"NOOP\r\n")
        assert 0 < answered <= ANSWERED_BOUND, answered
        assert not attacker.lost
        # Meanwhile a fresh client is served as usual.
        assert await in_thread(deliver, server, b"meanwhile") == 250


@pytest_twisted.ensureDeferred
async def test_a_late_reader_gets_every_reply_in_order(qpconn_server, write_path):
    # 50,000 pipelined NOOPs then QUIT, read only once the server has stopped for want of
    # a reader: it starts again as the replies are taken, and loses none.
    server = qpconn_server(files={"timeout": "30"})
    count = 50_000
    paused = threading.Event()

    def client() -> list[bytes]:
        with Client(server.address) as other, ehlo(server) as smtp:
            assert other.greeting.code == 220
            smtp.send(b"NOOP\r\n" * count + b"QUIT\r\n")
            assert paused.wait(PATIENCE)
            data = b""
            smtp.sock.settimeout(PATIENCE)
            while chunk := smtp.sock.recv(65536):
                data += chunk
            return data.split(b"\r\n")

    reading = in_thread(client)
    assert await until(lambda: any(p.held for p in server.factory.sessions))
    paused.set()
    lines = await reading
    assert lines[-1] == b""
    assert [line[:4] for line in lines[:-2]] == [b"250 "] * count
    assert lines[-2].startswith(b"221 ")


@pytest_twisted.ensureDeferred
async def test_fifty_non_readers_at_once_and_a_normal_client_is_served(
    qpconn_server, write_path, deadline_events
):
    # A timeout long enough that no attacker meets it before its burst is in (50
    # connections and 30 MB offered on a loaded machine), short enough for a test.
    server = qpconn_server(files={"timeout": "10"})

    def connect_all() -> list[socket.socket]:
        return [non_reader(server.address) for _ in range(50)]

    with ExitStack() as held:
        socks = [held.enter_context(sock) for sock in await in_thread(connect_all)]
        ports = {sock.getsockname()[1] for sock in socks}
        sent = await in_thread(pipeline_until_stalled, socks, NOOPS[:600_000], 1.0)
        attackers = sessions_from(server, ports)
        assert len(attackers) == 50
        states = lambda: [(p.held, p.lost, p.bytes_received) for p in attackers]  # noqa: E731
        assert await until(lambda: all(p.held for p in attackers)), states()
        read = [p.bytes_received for p in attackers]
        assert max(read) <= READ_BOUND, max(read)
        assert sum(sent) > 4 * sum(read), (sum(sent), sum(read))
        started = time.monotonic()
        assert await in_thread(deliver, server, b"among fifty") == 250
        assert time.monotonic() - started < PATIENCE
        assert await until(lambda: all(p.lost for p in attackers), 10.0 + PATIENCE), states()
    assert sorted(e["limit"] for e in deadline_events) == ["timeout"] * 50, deadline_events
    assert len(server.messages()) == 1
    await server.wait_sessions_closed()
    assert not server.factory.sessions


def test_a_close_the_client_never_completes_is_aborted_after_timeout(tmp_path, deadline_events):
    # In process, where a close can be held up at will: the transport is told to close
    # after the 221 and never does (a client that does not take that last reply). The
    # idle timer, still running, aborts it after `timeout`.
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from qpconn.config import Config
    from qpconn.server.factory import SMTPFactory
    from qpconn.server.peerinfo import LookupSettings
    from tests.support.server import write_config

    config = Config(write_config(str(tmp_path / "c"), {"me": "mx.test", "timeout": "7"}))
    clock = Clock()
    factory = SMTPFactory(config, [], clock=clock, lookups=LookupSettings(rdns=False))
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
    )
    protocol = factory.buildProtocol(transport.getPeer())
    protocol.callLater = clock.callLater  # the idle timer on the fake clock
    protocol.makeConnection(transport)
    assert transport.producer is protocol  # the transport's producer, in memory too
    protocol.dataReceived(b"QUIT\r\n")
    assert transport.value().endswith(b"221 2.0.0 mx.test closing connection\r\n")
    assert transport.disconnecting and not transport.disconnected
    assert transport.producer is None  # unregistered, or Twisted would wait for it
    clock.advance(6.9)
    assert not transport.disconnected and deadline_events == []
    clock.advance(0.2)
    assert transport.disconnected  # abortConnection
    assert [(e["limit"], e["reason"]) for e in deadline_events] == [
        ("timeout", "replies not read for 7s")
    ]
