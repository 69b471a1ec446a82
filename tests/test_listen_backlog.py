"""The listen backlog (qpconn.server.backlog): a wave of connections waits in the kernel.

Twisted's endpoints listen with a backlog of 50; past it Linux drops the SYNs of further
clients, who retry only after a second or more. qpconn's ``tcp:``, ``tcp6:`` and ``ssl:``
listeners get a deeper one unless their endpoint string names one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from qpconn.app.service import parse_listen
from qpconn.server.backlog import DEFAULT_BACKLOG, with_default_backlog
from qpconn.server.tlsendpoint import parse_ssl_listen
from tests.support.server import in_thread, read_replies
from tests.support.timing import wait_until

#: more than Twisted's 50, fewer than DEFAULT_BACKLOG
WAVE = 300
PATIENCE = 30.0


@pytest.mark.parametrize(
    ("given", "listened"),
    [
        ("tcp:25", f"tcp:25:backlog={DEFAULT_BACKLOG}"),
        ("tcp:2525:interface=127.0.0.1", f"tcp:2525:interface=127.0.0.1:backlog={DEFAULT_BACKLOG}"),
        (r"tcp6:25:interface=\:\:", rf"tcp6:25:interface=\:\::backlog={DEFAULT_BACKLOG}"),
        ("tcp:port=25", f"tcp:port=25:backlog={DEFAULT_BACKLOG}"),
        # the string's own backlog is kept, given by name or by position
        ("tcp:25:backlog=7", "tcp:25:backlog=7"),
        ("tcp:25:127.0.0.1:7", "tcp:25:127.0.0.1:7"),
        ("tcp6:25:7", "tcp6:25:7"),
        # other kinds have no backlog of ours to give
        ("unix:/run/qpconn.sock", "unix:/run/qpconn.sock"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_tcp_listeners_without_a_backlog_get_qpconns(given, listened):
    assert with_default_backlog(given) == listened


def test_an_ssl_listener_gets_the_backlog_too_unless_it_names_one():
    assert parse_ssl_listen(with_default_backlog("ssl:465")).backlog == DEFAULT_BACKLOG
    assert parse_ssl_listen(with_default_backlog("ssl:465:backlog=9")).backlog == 9


def accept_queue(port: int) -> int | None:
    """Connections the kernel holds for the listening socket on ``port``, not yet
    accepted (``ss``'s Recv-Q of a listening socket); None if it is not listed."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == "LISTEN":
            return int(fields[1])
    return None


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@pytest_twisted.ensureDeferred
async def test_a_wave_of_300_connections_waits_in_the_backlog_and_is_greeted(server):
    # A listener made as `twistd qpconn --listen` makes it, serving the test server's
    # factory; it does not accept while the wave arrives (a busy reactor), so every
    # connection of the wave has to wait in the kernel. With Twisted's backlog of 50 the
    # queue would stop at 51 and the other clients' SYNs be dropped.
    endpoint, lmtp = parse_listen(reactor, "tcp:0:interface=127.0.0.1")
    assert not lmtp
    port = await endpoint.listen(server.factory)
    number = port.getHost().port
    port.stopReading()
    socks: list[socket.socket] = []
    try:

        def connect_wave() -> None:
            for _ in range(WAVE):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", number))  # EINPROGRESS: the kernel goes on

        await in_thread(connect_wave)
        queued = await in_thread(
            wait_until, lambda: accept_queue(number) == WAVE, timeout=PATIENCE
        )
        assert queued, f"accept queue {accept_queue(number)}, wanted {WAVE}"
        port.startReading()

        def greetings() -> list[bytes]:
            deadline = time.monotonic() + PATIENCE
            found = []
            for sock in socks:
                sock.setblocking(True)
                left = max(0.1, deadline - time.monotonic())
                found.append(read_replies(sock, 1, timeout=left)[:4])
            return found

        assert await in_thread(greetings) == [b"220 "] * WAVE
    finally:
        for sock in socks:
            sock.close()
        await port.stopListening()
