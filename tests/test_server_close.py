"""The close after a session's last reply (qpconn.server.fastpath.fastwrite.close_when_sent).

A socket with nothing queued is closed at the end of the turn together with its last reply,
without the write pass Twisted's ``loseConnection()`` makes (register for writability,
wait a reactor iteration, find nothing to write, unregister). Whatever the path, the client
gets every reply, the last one, then the end of the connection, and the session ends as
one whose client quit (``connectionLost`` with ``ConnectionDone``, the disconnect line).
The fallback (a transport the fast path does not know, or Twisted's internals missing) is
``write()`` then ``loseConnection()``, and must behave the same.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import error, tcp
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from qpconn.server.fastpath import fastwrite
from tests.support.server import in_thread, read_replies, reply_codes

SCRIPT = b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@mx.test>\r\nQUIT\r\n"


@pytest.fixture
def write_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every time a server socket is registered for writability (Twisted's write pass)."""
    passes: list[int] = []
    start_writing = tcp.Server.startWriting

    def counted(self: tcp.Server) -> None:
        passes.append(self.fileno())
        start_writing(self)

    monkeypatch.setattr(tcp.Server, "startWriting", counted)
    return passes


@pytest.fixture
def disconnects() -> Iterator[list[dict[str, Any]]]:
    found: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if str(event.get("log_format", "")).startswith("{conn_id} disconnect"):
            found.append(event)

    globalLogPublisher.addObserver(observer)
    yield found
    globalLogPublisher.removeObserver(observer)


def quit_session(address: tuple[str, int]) -> tuple[bytes, bytes]:
    """Send SCRIPT, read until the server closes; also what a read after the close gives."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(SCRIPT)
        data = read_replies(sock, None)  # until the server closes (bounded by the timeout)
        return data, sock.recv(1)


@pytest.mark.parametrize("fast", [True, False], ids=["fast close", "fallback"])
@pytest_twisted.ensureDeferred
async def test_quit_gets_every_reply_then_the_close_and_the_session_ends(
    server, monkeypatch, write_passes, disconnects, fast
):
    lost: list[Any] = []
    protocol_class = server.factory.protocol
    connection_lost = protocol_class.connectionLost

    def record(self: Any, reason: Any = None) -> None:
        lost.append(reason)
        connection_lost(self, reason)

    monkeypatch.setattr(protocol_class, "connectionLost", record)
    if not fast:  # what fastwrite does when Twisted's internals it reads are not there
        monkeypatch.setattr(fastwrite, "_idle", lambda transport: False)

    data, after = await in_thread(quit_session, server.address)
    assert reply_codes(data) == [220, 250, 250, 250, 221]
    assert after == b""  # the connection is closed, nothing follows the 221
    await server.wait_sessions_closed()
    assert not server.factory.sessions
    assert len(lost) == 1 and lost[0].check(error.ConnectionDone)  # a clean close
    assert [event["log_format"] for event in disconnects] == ["{conn_id} disconnect"]
    if fast:
        assert write_passes == []  # every reply went straight out; the close needed no pass
    else:
        assert write_passes  # Twisted's own write path sent and closed


@pytest_twisted.ensureDeferred
async def test_an_idle_timeout_421_then_the_close(qpconn_server, write_passes, disconnects):
    server = qpconn_server(files={"timeout": "0.3"})

    def idle_client() -> bytes:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"EHLO client.test\r\n")
            return read_replies(sock, None)  # the server times out and closes

    data = await in_thread(idle_client)
    codes = reply_codes(data)
    assert codes == [220, 250, 421]
    assert b"timeout exceeded" in data.rsplit(b"\r\n", 2)[-2]
    await server.wait_sessions_closed()
    assert write_passes == []
    assert [event["log_format"] for event in disconnects] == [
        "{conn_id} disconnect: closed by the server after {reply}"
    ]


def test_a_transport_that_is_not_a_plain_socket_gets_write_then_lose_connection():
    transport = StringTransport()
    fastwrite.close_when_sent(transport, b"221 2.0.0 Bye\r\n")
    assert transport.value() == b"221 2.0.0 Bye\r\n"
    assert transport.disconnecting
