"""Our side of each connection (Connection.local_ip / local_port), as plugins see it.

A port bound to one address gives every accepted socket that address, so the factory
reads it once per listening port; these tests check that each connection still gets the
address and port of the listener it came through, with several listeners on one factory.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from qpconn.plugins import Plugin
from tests.support.server import in_thread


class SeeLocal(Plugin):
    """connect: records (local_ip, local_port, remote_ip) of every connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str | None, int | None, str | None]] = []

    def hook_connect(self, transaction: Any) -> Any:
        conn = transaction.connection
        self.seen.append((conn.local_ip, conn.local_port, conn.remote_ip))
        return None


def _greet(address: tuple[str, int]) -> bytes:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(address)
        greeting = sock.recv(1024)
        sock.sendall(b"QUIT\r\n")
        sock.recv(1024)
        return greeting


def _server_seeing(qpconn_server: Any) -> tuple[Any, SeeLocal]:
    server = qpconn_server(plugins=[SeeLocal, "rcpt_ok"])
    (see,) = [p for p in server.factory.plugins if isinstance(p, SeeLocal)]
    return server, see


async def _greet_all(extra_port: Any, addresses: list[tuple[str, int]]) -> None:
    """One greeted session per address, in order; then the extra listener stops."""
    try:
        for address in addresses:
            assert (await in_thread(_greet, address)).startswith(b"220 ")
    finally:
        await extra_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_each_listener_gives_its_own_address_and_port(qpconn_server):
    server, see = _server_seeing(qpconn_server)
    first_address = server.address
    second = reactor.listenTCP(0, server.factory, interface="127.0.0.2")
    second_address = ("127.0.0.2", second.getHost().port)
    await _greet_all(second, [first_address, second_address, first_address, second_address])
    assert [entry[:2] for entry in see.seen] == [
        first_address,
        second_address,
        first_address,
        second_address,
    ]
    assert [entry[2] for entry in see.seen] == ["127.0.0.1"] * 4


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1 on this machine")
@pytest_twisted.ensureDeferred
async def test_an_ipv6_listener_gives_its_address(qpconn_server):
    server, see = _server_seeing(qpconn_server)
    port = reactor.listenTCP(0, server.factory, interface="::1")
    address = ("::1", port.getHost().port)
    await _greet_all(port, [address])
    assert see.seen == [("::1", address[1], "::1")]
