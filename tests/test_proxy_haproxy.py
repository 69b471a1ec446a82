"""A real HAProxy (Debian's package) in front of qpconn, sending PROXY v1 and v2 headers.

HAProxy is started by the test on loopback ports, in the foreground (``-db``), and is
always terminated. The client binds 127.0.0.2, HAProxy connects to qpconn from
127.0.0.1: the connect hook must see 127.0.0.2, i.e. the header, not the socket.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted

from tests.e2e_client import Client
from tests.support.process import free_port
from tests.support.server import in_thread
from tests.test_e2e_lookups import BoundClient, received_line
from tests.test_proxy_e2e import MESSAGE, start

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CLIENT_IP = "127.0.0.2"


def haproxy_config(path: Path, frontend_port: int, backend_port: int, send_proxy: str) -> Path:
    """The smallest configuration that forwards TCP with a PROXY header."""
    path.write_text(
        "\n".join(
            [
                "global",
                "    maxconn 64",
                "defaults",
                "    mode tcp",
                "    timeout connect 2s",
                "    timeout client 10s",
                "    timeout server 10s",
                "frontend smtp",
                f"    bind 127.0.0.1:{frontend_port}",
                "    default_backend qpconn",
                "backend qpconn",
                f"    server qp 127.0.0.1:{backend_port} {send_proxy}",
                "",
            ]
        )
    )
    return path


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[int, str], int]]:
    """Call it with (backend port, "send-proxy" | "send-proxy-v2"); returns the frontend port."""
    if not os.access(HAPROXY, os.X_OK):
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    processes: list[subprocess.Popen[bytes]] = []

    def run(backend_port: int, send_proxy: str) -> int:
        port = free_port()
        config = haproxy_config(tmp_path / f"haproxy-{port}.cfg", port, backend_port, send_proxy)
        check = subprocess.run(
            [HAPROXY, "-c", "-f", str(config)], capture_output=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr
        log = open(tmp_path / f"haproxy-{port}.log", "wb")  # noqa: SIM115 - closed below
        processes.append(
            subprocess.Popen(
                [HAPROXY, "-f", str(config), "-db"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()  # the child has its own copy
        return port

    yield run
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def connect_when_ready(port: int, deadline: float = 10.0) -> Client:
    """Connect from CLIENT_IP once HAProxy listens (bounded); the first success is the test.

    Polling with the real client (rather than a probe connection) keeps HAProxy from
    opening an extra backend session that the connect hook would record.
    """
    end = time.monotonic() + deadline
    while True:
        try:
            return BoundClient(("127.0.0.1", port), CLIENT_IP)
        except ConnectionRefusedError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
@pytest_twisted.ensureDeferred
async def test_haproxy_header_gives_the_client_address_to_hooks_and_received(
    qpconn_server, tmp_path, haproxy, send_proxy
):
    server, rec = start(qpconn_server, tmp_path)  # trusts loopback, i.e. HAProxy
    frontend = haproxy(server.address[1], send_proxy)

    def client() -> tuple[int, int, int]:
        with connect_when_ready(frontend) as c:
            port = c.sock.getsockname()[1]
            assert c.cmd("EHLO client.test").code == 250
            code = c.transaction("<a@example.org>", ["<user@mx.test>"], MESSAGE).code
            assert c.cmd("QUIT").code == 221
            return c.greeting.code, code, port

    greeting, code, port = await in_thread(client)
    assert (greeting, code) == (220, 250)
    (seen,) = rec.seen
    assert (seen.remote_ip, seen.remote_port) == (CLIENT_IP, port)
    assert (seen.local_ip, seen.local_port) == ("127.0.0.1", frontend)
    assert received_line(server.messages()[0]) == (
        b"Received: from client.test (unknown [127.0.0.2])"
    )


@pytest_twisted.ensureDeferred
async def test_haproxy_without_send_proxy_is_refused(qpconn_server, tmp_path, haproxy):
    """A balancer misconfigured to send no header: the session never starts."""
    server, rec = start(qpconn_server, tmp_path)
    frontend = haproxy(server.address[1], "")

    def client() -> bytes:
        end = time.monotonic() + 10
        while True:
            try:
                sock = socket.create_connection(
                    ("127.0.0.1", frontend), timeout=3, source_address=(CLIENT_IP, 0)
                )
                break
            except ConnectionRefusedError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        with sock:
            sock.sendall(b"EHLO client.test\r\n")
            data = b""
            for _ in range(100):  # bounded: until HAProxy passes on the close
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data

    assert await in_thread(client) == b""
    await server.wait_sessions_closed()
    assert rec.calls == []
