"""Per-address connection limits on by default (issue 15, item 3), as Postfix's anvil has them.

``max_connections_per_ip`` (50 concurrent sessions per client address) and
``max_connection_rate`` per ``connection_rate_window`` (60 a minute), with loopback and
the relay clients exempt unless ``connection_limit_exceptions`` says otherwise. Every
test here talks to a real server over loopback with raw sockets; the limits are applied
to 127.0.0.1 with an empty ``connection_limit_exceptions`` file, and 127.0.0.2 (a client
socket bound to it) stands for a second client.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from qpconn.app.metrics import ServerMetrics
from qpconn.config import Config
from qpconn.smtp.limits import ConnectionCounter, SessionLimits, limit_exceptions
from tests.support.server import in_thread, write_config

#: applies the per-address limits to loopback (exempt by default)
LIMITS_ON_LOOPBACK = {"connection_limit_exceptions": ""}
#: a bound for waiting on something the server does at once (generous: shared machine)
PATIENCE = 30.0


def greeting(address: tuple[str, int], source: str = "127.0.0.1") -> tuple[socket.socket, bytes]:
    """A connection from ``source`` and the first line the server sent on it."""
    sock = socket.create_connection(address, timeout=10, source_address=(source, 0))
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return sock, data


def one_shot(address: tuple[str, int], source: str = "127.0.0.1") -> bytes:
    """Connect, take the first line, say QUIT if greeted, close: what a session said first."""
    sock, line = greeting(address, source)
    with sock:
        if line.startswith(b"220"):
            sock.sendall(b"QUIT\r\n")
            while sock.recv(4096):  # until the server closes after 221
                pass
    return line


def until_greeted(address: tuple[str, int], source: str = "127.0.0.1") -> tuple[bytes, int]:
    """Connect again and again (bounded) until greeted with 220: the first line, tries."""
    deadline = time.monotonic() + PATIENCE
    tries = 0
    while True:
        tries += 1
        line = one_shot(address, source)
        if line.startswith(b"220") or time.monotonic() > deadline:
            return line, tries
        time.sleep(0.05)


@pytest.fixture
def refusals() -> Iterator[list[dict[str, Any]]]:
    """The ``connection_refused`` log events while the test runs."""
    found: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("event") == "connection_refused":
            found.append(event)

    globalLogPublisher.addObserver(observe)
    yield found
    globalLogPublisher.removeObserver(observe)


def refused_metric(metrics: ServerMetrics, limit: str) -> float:
    value = metrics.registry.get_sample_value("qpconn_connections_refused_total", {"limit": limit})
    return value or 0.0


@pytest_twisted.ensureDeferred
async def test_the_51st_concurrent_connection_from_one_address_gets_421_until_one_closes(
    qpconn_server, refusals
):
    server = qpconn_server(files=LIMITS_ON_LOOPBACK)  # the default limit: 50
    metrics = ServerMetrics(server.factory).attach()

    def client() -> tuple[list[bytes], bytes, bytes, bytes]:
        with ExitStack() as held:
            socks, firsts = [], []
            for _ in range(50):
                sock, line = greeting(server.address)
                held.callback(sock.close)
                socks.append(sock)
                firsts.append(line)
            _, refused = greeting(server.address)
            other, other_line = greeting(server.address, "127.0.0.2")  # another client
            other.close()
            # One of the 50 goes, 49 stay: its place is free once the server saw it go.
            socks[0].close()
            freed, _ = until_greeted(server.address)
            return firsts, refused, other_line, freed

    firsts, refused, other_line, freed = await in_thread(client)
    metrics.detach()
    assert all(line.startswith(b"220 ") for line in firsts)
    assert refused == (
        b"421 4.7.0 mx.test Too many connections from your address, try again later\r\n"
    )
    assert other_line.startswith(b"220 ")  # the limit is per address
    assert freed.startswith(b"220 ")
    # the 51st, and the tries made before the server had seen the closed one go
    assert refusals and {(event["limit"], event["remote_ip"]) for event in refusals} == {
        ("max_connections_per_ip", "127.0.0.1")
    }
    assert refused_metric(metrics, "max_connections_per_ip") == len(refusals)


@pytest_twisted.ensureDeferred
async def test_the_connection_rate_is_limited_per_address_and_recovers(qpconn_server, refusals):
    # A short window instead of a minute; 5 s leaves the four connections below ample time.
    server = qpconn_server(
        files={**LIMITS_ON_LOOPBACK, "max_connection_rate": "3", "connection_rate_window": "5"}
    )
    metrics = ServerMetrics(server.factory).attach()

    def client() -> tuple[list[bytes], bytes, bytes, bytes, int]:
        admitted = [one_shot(server.address) for _ in range(3)]  # closed at once: rate only
        too_fast = one_shot(server.address)
        other = one_shot(server.address, "127.0.0.2")
        recovered, tries = until_greeted(server.address)
        return admitted, too_fast, other, recovered, tries

    admitted, too_fast, other, recovered, tries = await in_thread(client)
    metrics.detach()
    assert all(line.startswith(b"220 ") for line in admitted)
    assert too_fast == (
        b"421 4.7.0 mx.test Too many connections from your address in a short time,"
        b" try again later\r\n"
    )
    assert other.startswith(b"220 ")  # another address has a window of its own
    assert recovered.startswith(b"220 ")  # the window is over: the address is let in again
    assert {event["limit"] for event in refusals} == {"max_connection_rate"}
    assert refused_metric(metrics, "max_connection_rate") == len(refusals) == tries
    # Refused attempts were not counted: the new window holds the one admitted session.
    assert server.factory.connection_counter.recent["127.0.0.1"][1] == 1


@pytest_twisted.ensureDeferred
async def test_loopback_is_exempt_by_default(qpconn_server):
    server = qpconn_server(files={"max_connections_per_ip": "1", "max_connection_rate": "1"})

    def client() -> list[bytes]:
        with ExitStack() as held:
            lines = []
            for source in ("127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"):
                sock, line = greeting(server.address, source)
                held.callback(sock.close)
                lines.append(line)
            return lines

    assert all(line.startswith(b"220 ") for line in await in_thread(client))


@pytest_twisted.ensureDeferred
async def test_listed_exceptions_are_unaffected_and_the_others_limited(qpconn_server):
    server = qpconn_server(
        files={"max_connections_per_ip": "1", "connection_limit_exceptions": "127.0.0.2\n"}
    )

    def client() -> tuple[list[bytes], bytes]:
        with ExitStack() as held:
            exempt = []
            for _ in range(3):
                sock, line = greeting(server.address, "127.0.0.2")
                held.callback(sock.close)
                exempt.append(line)
            sock, _ = greeting(server.address)
            held.callback(sock.close)
            _, limited = greeting(server.address)
            return exempt, limited

    exempt, limited = await in_thread(client)
    assert all(line.startswith(b"220 ") for line in exempt)
    assert limited.startswith(b"421 4.7.0 mx.test Too many connections from your address")


def test_relay_clients_are_exempt_by_default_and_an_exceptions_file_replaces_the_list(tmp_path):
    config_dir = write_config(
        str(tmp_path / "config"), {"relayclients": "192.0.2.0/24\n", "morerelayclients": "10.1.\n"}
    )
    default = limit_exceptions(Config(config_dir))
    assert all(ip in default for ip in ("127.0.0.1", "127.9.9.9", "::1", "192.0.2.77", "10.1.2.3"))
    assert "198.51.100.1" not in default and "10.2.0.1" not in default
    write_config(config_dir, {"connection_limit_exceptions": "198.51.100.0/24\n"})
    listed = limit_exceptions(Config(config_dir))
    assert "198.51.100.1" in listed
    assert "127.0.0.1" not in listed and "192.0.2.77" not in listed


def test_the_rate_table_forgets_windows_that_are_over_and_stays_bounded():
    limits = SessionLimits(max_connections_per_ip=0, max_connection_rate=2,
                           connection_rate_window=60.0)  # fmt: skip
    counter = ConnectionCounter(table_size=100)
    for n in range(1000):  # a thousand addresses in one window: only the last 100 kept
        assert counter.admit(f"10.0.{n // 256}.{n % 256}", limits, now=1.0) is None
    assert len(counter.recent) == 100
    # A window is over 60 s after it began: the next connection drops every old one.
    assert counter.admit("192.0.2.1", limits, now=61.0) is None
    assert list(counter.recent) == ["192.0.2.1"]
    assert counter.admit("192.0.2.1", limits, now=62.0) is None
    assert counter.admit("192.0.2.1", limits, now=63.0) == "max_connection_rate"
    assert counter.admit("192.0.2.1", limits, now=121.0) is None  # a new window
    # A clock set back does not lock an address out: its window is forgotten.
    assert counter.admit("192.0.2.1", limits, now=5.0) is None
    assert counter.recent["192.0.2.1"] == [5.0, 1]
