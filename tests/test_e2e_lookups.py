"""rDNS, FCrDNS and ident end to end: a real qpconn, a real DNS server, a real ident server.

Clients bind to distinct 127.0.0.x source addresses, so each case has its own peer
address (and its own PTR record) on loopback. Every lookup goes to the test's own DNS
server: ``dns_servers`` is always explicit, the machine's resolver is never asked.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted

from qpconn.app.options import Options, lookup_settings, makeService
from qpconn.app.service import make_factory
from qpconn.config import Config
from qpconn.plugins import Plugin
from qpconn.server.peerinfo import LookupSettings, clear_shared_cache
from tests.e2e_client import Client
from tests.support.dnsserver import DNSTestServer, start_dns_server
from tests.support.identserver import IdentTestServer, start_ident_server, unused_port
from tests.support.process import ipv6_loopback
from tests.support.server import RunningServer, in_thread

#: the timeouts of the tests that make a lookup time out
DNS_TIMEOUT = 0.5
IDENT_TIMEOUT = 0.5
#: the timeouts of every other test: a lookup that answers is never mistaken for one that
#: timed out, however loaded the machine, and "answered" means in under half of it
LONG_TIMEOUT = 30.0
#: the defaults (config.md): a test's timeout ending the wait in under half of the
#: default was the test's own, not the default
DEFAULT_DNS_TIMEOUT, DEFAULT_IDENT_TIMEOUT = 5.0, 3.0


def rev(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


ZONE: dict[str, list[tuple[Any, ...]]] = {
    rev("127.0.0.1"): [("PTR", "ident-host.test.")],
    "ident-host.test": [("A", "127.0.0.1")],
    rev("127.0.0.21"): [("PTR", "Good.Test.")],
    "good.test": [("A", "127.0.0.21")],
    rev("127.0.0.22"): [("PTR", "liar.test.")],
    "liar.test": [("A", "127.9.9.9")],
    # 127.0.0.23 has no PTR: NXDOMAIN
    rev("127.0.0.26"): [("PTR", b"evil\r\nX-Injected: yes.test.")],
    rev("::1"): [("PTR", "v6.test.")],
    "v6.test": [("AAAA", "::1")],
}
SERVFAIL_IP = "127.0.0.24"
HANG_IP = "127.0.0.25"


@dataclass(frozen=True)
class Seen:
    """What one connect hook saw."""

    remote_ip: str | None
    remote_port: int | None
    remote_host: str | None
    remote_host_verified: bool
    remote_info: str | None
    local_ip: str | None
    local_port: int | None


class Recorder(Plugin):
    """Remembers the connection facts at ``connect`` and counts every hook it gets."""

    def register(self) -> None:
        self.seen: list[Seen] = []
        self.calls: list[str] = []

    def hook_pre_connection(self, transaction: Any) -> None:
        self.calls.append("pre-connection")

    def hook_connect(self, transaction: Any) -> None:
        self.calls.append("connect")
        c = transaction.connection
        self.seen.append(
            Seen(
                c.remote_ip,
                c.remote_port,
                c.remote_host,
                c.remote_host_verified,
                c.remote_info,
                c.local_ip,
                c.local_port,
            )
        )

    def hook_disconnect(self, transaction: Any) -> None:
        self.calls.append("disconnect")


def recorder() -> Recorder:
    return Recorder(Config(None), "recorder")


class BoundClient(Client):
    """A Client whose socket is bound to ``source`` first, so the server sees that peer.

    ``preamble`` is sent before the greeting is read (a PROXY header, early talk).
    """

    def __init__(
        self,
        address: tuple[str, int],
        source: str = "127.0.0.1",
        *,
        preamble: bytes = b"",
        timeout: float = 30.0,
    ) -> None:
        self.sock = socket.create_connection(address, timeout=timeout, source_address=(source, 0))
        self.timeout = timeout
        self._buf = b""
        if preamble:
            self.sock.sendall(preamble)
        self.greeting = self.reply()


def send_one(address: tuple[str, int], source: str) -> tuple[float, int]:
    """Connect from ``source``, time the greeting, deliver one message; (seconds, code)."""
    start = time.monotonic()
    with BoundClient(address, source) as client:
        elapsed = time.monotonic() - start
        assert client.greeting.code == 220, client.greeting
        assert client.cmd("EHLO client.test").code == 250
        reply = client.transaction(
            "<sender@example.org>", ["<user@mx.test>"], b"Subject: lookups\r\n\r\nbody"
        )
        client.cmd("QUIT")
    return elapsed, reply.code


def received_line(message: bytes) -> bytes:
    """The first line of our Received field."""
    for line in message.split(b"\n"):  # a Maildir file: LF line endings
        if line.startswith(b"Received: "):
            return line
    raise AssertionError(f"no Received field in {message[:300]!r}")


@pytest.fixture(autouse=True)
def fresh_lookup_cache() -> Iterator[None]:
    """Cached answers of an earlier test's DNS server must not answer this test's lookups."""
    clear_shared_cache()
    yield
    clear_shared_cache()


@pytest_twisted.async_yield_fixture
async def dns() -> AsyncIterator[DNSTestServer]:
    srv = start_dns_server(ZONE, servfail={rev(SERVFAIL_IP)}, hang={rev(HANG_IP)})
    yield srv
    await srv.stop()


@pytest_twisted.async_yield_fixture
async def ident() -> AsyncIterator[Callable[..., IdentTestServer]]:
    started: list[IdentTestServer] = []

    def make(mode: str = "user", **kw: Any) -> IdentTestServer:
        srv = start_ident_server(mode, **kw)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.stop()


def start(
    qpconn_server: Callable[..., RunningServer],
    tmp_path: Any,
    dns: DNSTestServer,
    *,
    ident_port: int | None = None,
    interface: str = "127.0.0.1",
    dns_timeout: float = LONG_TIMEOUT,
    ident_timeout: float = LONG_TIMEOUT,
) -> tuple[RunningServer, Recorder]:
    """qpconn with lookups pointed at our servers; ident is always on (refused if no port)."""
    rec = recorder()
    lookups = LookupSettings(
        dns_servers=[dns.address],
        dns_timeout=dns_timeout,
        ident=True,
        ident_port=ident_port or unused_port(),
        ident_timeout=ident_timeout,
    )
    server = qpconn_server(
        plugins=[rec, "relay", "rcpt_ok", f"queue/maildir {tmp_path / 'maildir'}"],
        lookups=lookups,
        interface=interface,
    )
    return server, rec


@pytest.mark.parametrize(
    ("peer", "host", "verified", "in_header"),
    [
        pytest.param("127.0.0.21", "good.test", True, b"good.test", id="confirmed"),
        pytest.param("127.0.0.22", "liar.test", False, b"liar.test", id="not-confirmed"),
        pytest.param("127.0.0.23", None, False, b"unknown", id="nxdomain"),
        pytest.param(SERVFAIL_IP, None, False, b"unknown", id="servfail"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_connect_hook_sees_final_rdns_and_received_header_names_it(
    qpconn_server, tmp_path, dns, peer, host, verified, in_header
):
    server, rec = start(qpconn_server, tmp_path, dns)
    _, code = await in_thread(send_one, server.address, peer)
    assert code == 250
    (seen,) = rec.seen
    assert (seen.remote_ip, seen.remote_host, seen.remote_host_verified) == (peer, host, verified)
    assert seen.remote_info is None  # nothing answers ident on that address
    (message,) = server.messages()
    assert received_line(message) == b"Received: from client.test (%s [%s])" % (
        in_header,
        peer.encode(),
    )


@pytest_twisted.ensureDeferred
async def test_dns_server_that_never_answers_delays_greeting_only_up_to_dns_timeout(
    qpconn_server, tmp_path, dns
):
    server, rec = start(qpconn_server, tmp_path, dns, dns_timeout=DNS_TIMEOUT)
    elapsed, code = await in_thread(send_one, server.address, HANG_IP)
    assert code == 250
    # The connect hook waits for the lookup's deadline (so it sees final values) ...
    assert elapsed >= DNS_TIMEOUT - 0.05
    # ... which is the 0.5 s given, not the 5 s default.
    assert elapsed < DEFAULT_DNS_TIMEOUT / 2
    assert dns.count(rev(HANG_IP), "PTR") >= 1  # it really asked, and waited
    assert rec.seen[0].remote_host is None and not rec.seen[0].remote_host_verified
    assert b"(unknown [%s])" % HANG_IP.encode() in received_line(server.messages()[0])


@pytest_twisted.ensureDeferred
async def test_hostile_ptr_bytes_never_reach_plugins_or_headers(qpconn_server, tmp_path, dns):
    server, rec = start(qpconn_server, tmp_path, dns)
    _, code = await in_thread(send_one, server.address, "127.0.0.26")
    assert code == 250
    assert rec.seen[0].remote_host is None
    (message,) = server.messages()
    assert received_line(message) == b"Received: from client.test (unknown [127.0.0.26])"
    assert b"X-Injected" not in message and b"evil" not in message


@pytest_twisted.ensureDeferred
async def test_ident_user_shows_in_received_header_as_sendmail_writes_it(
    qpconn_server, tmp_path, dns, ident
):
    srv = ident("user", user="alice")
    server, rec = start(qpconn_server, tmp_path, dns, ident_port=srv.port)
    _, code = await in_thread(send_one, server.address, "127.0.0.1")
    assert code == 250
    (seen,) = rec.seen
    assert seen.remote_info == "alice"
    assert (seen.remote_host, seen.remote_host_verified) == ("ident-host.test", True)
    # The query names the client's port, then ours (RFC 1413).
    assert srv.requests == [b"%d , %d" % (seen.remote_port, seen.local_port)]
    assert received_line(server.messages()[0]) == (
        b"Received: from client.test (alice@ident-host.test [127.0.0.1])"
    )


@pytest.mark.parametrize("mode", ["no-user", "hidden-user", "refused", "hang"])
@pytest_twisted.ensureDeferred
async def test_ident_errors_leave_remote_info_none_within_ident_timeout(
    qpconn_server, tmp_path, dns, ident, mode
):
    port = unused_port() if mode == "refused" else ident(mode).port
    # a hanging ident service meets the short timeout; the others must end the wait themselves
    timeout = IDENT_TIMEOUT if mode == "hang" else LONG_TIMEOUT
    server, rec = start(qpconn_server, tmp_path, dns, ident_port=port, ident_timeout=timeout)
    elapsed, code = await in_thread(send_one, server.address, "127.0.0.1")
    assert code == 250
    if mode == "hang":  # the 0.5 s given, not the 3 s default
        assert IDENT_TIMEOUT - 0.05 <= elapsed < DEFAULT_IDENT_TIMEOUT / 2
    else:  # answered (or refused), not timed out
        assert elapsed < LONG_TIMEOUT / 2
    assert rec.seen[0].remote_info is None
    assert rec.seen[0].remote_host == "ident-host.test"
    assert received_line(server.messages()[0]) == (
        b"Received: from client.test (ident-host.test [127.0.0.1])"
    )


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest_twisted.ensureDeferred
async def test_ipv6_peer_gets_ip6_arpa_name_confirmed_by_aaaa(qpconn_server, tmp_path, dns):
    server, rec = start(qpconn_server, tmp_path, dns, interface="::1")
    _, code = await in_thread(send_one, server.address, "::1")
    assert code == 250
    (seen,) = rec.seen
    assert (seen.remote_ip, seen.remote_host, seen.remote_host_verified) == ("::1", "v6.test", True)
    assert received_line(server.messages()[0]) == (
        b"Received: from client.test (v6.test [IPv6:::1])"
    )


# -- options and config ---------------------------------------------------------------------


def test_lookup_options_become_lookup_settings_and_config_timeouts_fill_the_rest(tmp_path):
    options = Options()
    options.parseOptions(
        [
            "--dns-server", "127.0.0.1:5353",
            "--dns-server", "[::1]:5300",
            "--ident",
            "--ident-port", "1113",
        ]
    )  # fmt: skip
    settings = lookup_settings(options)
    assert settings.rdns and settings.ident
    assert settings.dns_servers == [("127.0.0.1", 5353), ("::1", 5300)]
    assert settings.ident_port == 1113
    assert settings.dns_timeout is None and settings.ident_timeout is None

    config = tmp_path / "config"
    config.mkdir()
    (config / "dns_timeout").write_text("0.7\n")
    (config / "ident_timeout").write_text("0.4\n")
    factory = make_factory(str(config), plugins=[], lookups=settings)
    assert (factory.lookups.dns_timeout, factory.lookups.ident_timeout) == (0.7, 0.4)
    assert factory.peer_info.reverse is not None and factory.peer_info.reverse.timeout == 0.7

    defaults = make_factory(None, plugins=[], lookups=settings)
    assert (defaults.lookups.dns_timeout, defaults.lookups.ident_timeout) == (5.0, 3.0)


def test_no_rdns_and_defaults_through_twistd_make_service(tmp_path):
    options = Options()
    options.parseOptions(["--no-rdns", "--listen", "tcp:0:interface=127.0.0.1"])
    factory = makeService(options).factory  # type: ignore[attr-defined]
    assert not factory.lookups.rdns and factory.peer_info.reverse is None
    assert not factory.lookups.ident and factory.lookups.ident_port == 113
    assert factory.lookups.dns_servers is None


@pytest.mark.parametrize("bad", ["127.0.0.1:x", "127.0.0.1:70000", ":53"])
def test_bad_dns_server_option_is_a_usage_error(bad):
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match="--dns-server"):
        Options().parseOptions(["--dns-server", bad])


@pytest_twisted.ensureDeferred
async def test_config_dns_timeout_bounds_the_greeting_delay(qpconn_server, tmp_path, dns):
    """No timeout in the settings: the config file's ``dns_timeout`` decides (not 5 s)."""
    rec = recorder()
    server = qpconn_server(
        files={"dns_timeout": "0.3"},
        plugins=[rec, "relay", "rcpt_ok", f"queue/maildir {tmp_path / 'maildir'}"],
        lookups=LookupSettings(dns_servers=[dns.address]),
    )
    assert server.factory.lookups.dns_timeout == 0.3
    elapsed, code = await in_thread(send_one, server.address, HANG_IP)
    assert code == 250 and 0.25 <= elapsed < DEFAULT_DNS_TIMEOUT / 2  # 0.3 s, not 5 s
    assert rec.seen[0].remote_host is None
