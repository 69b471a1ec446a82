"""PROXY protocol in front of a real qpconn, with hand-made headers; its options and .tac settings.

Every malformed case is checked from the outside: the connection is closed, no byte of
banner was sent and no hook ran. Addresses inside the headers are loopback (or, with
lookups off, documentation addresses): nothing is ever sent to them.
"""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher
from twisted.python import usage

from qpconn.app.options import Options, makeService, proxy_settings
from qpconn.app.service import make_factory, make_service
from qpconn.core.proxy import V2_SIGNATURE
from qpconn.server.factory import SMTPFactory
from qpconn.server.peerinfo import LookupSettings
from qpconn.server.proxy import ProxySettings
from tests.support.dnsserver import DNSTestServer, start_dns_server
from tests.support.server import RunningServer, in_thread
from tests.support.timing import assert_within_timeout
from tests.test_e2e_lookups import (
    ZONE,
    BoundClient,
    Recorder,
    fresh_lookup_cache,  # noqa: F401 - autouse fixture, also for this module
    received_line,
    recorder,
    rev,
)

MESSAGE = b"Subject: proxied\r\n\r\nbody"  # Client.message adds CRLF . CRLF


def v1(line: str) -> bytes:
    return line.encode("ascii") + b"\r\n"


def v2(command: int = 1, family: int = 0x11, payload: bytes = b"", *, version: int = 2) -> bytes:
    """A v2 header: signature, version/command, family, length, payload."""
    head = bytes([version << 4 | command, family]) + len(payload).to_bytes(2, "big")
    return V2_SIGNATURE + head + payload


def v2_addresses(src: str, dst: str, sport: int, dport: int) -> bytes:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    return (
        socket.inet_pton(family, src)
        + socket.inet_pton(family, dst)
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


def v2_tcp4(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    return v2(1, 0x11, v2_addresses(src, dst, sport, dport) + tlvs)


def v2_tcp6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return v2(1, 0x21, v2_addresses(src, dst, sport, dport))


def start(
    qpconn_server: Callable[..., RunningServer],
    tmp_path: Any,
    proxy: ProxySettings | None = None,
    **kwargs: Any,
) -> tuple[RunningServer, Recorder]:
    """qpconn requiring a PROXY header (loopback trusted unless ``proxy`` says otherwise)."""
    rec = recorder()
    factory = functools.partial(SMTPFactory, proxy=proxy or ProxySettings(enabled=True))
    server = qpconn_server(
        plugins=[rec, "relay", "rcpt_ok", f"queue/maildir {tmp_path / 'maildir'}"],
        factory_class=factory,
        **kwargs,
    )
    return server, rec


def closed_silently(
    address: tuple[str, int], payload: bytes, source: str = "127.0.0.1", timeout: float = 10.0
) -> tuple[bytes, float]:
    """Send ``payload`` and read until the server closes: (bytes received, seconds taken)."""
    start = time.monotonic()
    received = b""
    with socket.create_connection(address, timeout=timeout, source_address=(source, 0)) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            pass  # closed before we finished writing: that is the point
        deadline = start + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                break
            except TimeoutError:
                raise AssertionError(f"still open after {timeout}s; got {received!r}") from None
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - start


@pytest.fixture
def refusals() -> Iterator[list[dict[str, Any]]]:
    """The adapter's log events about refused connections, while the test runs."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        namespace = event.get("log_namespace") or ""
        if namespace.startswith("qpconn.") and " refused " in event.get("log_format", ""):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


# -- headers that are accepted --------------------------------------------------------------


ACCEPTED = {  # header -> (remote, local) the hooks must see
    "v1-tcp4": (v1("PROXY TCP4 127.0.0.77 127.0.0.88 40001 2525"),
                ("127.0.0.77", 40001), ("127.0.0.88", 2525)),
    "v1-tcp6": (v1("PROXY TCP6 2001:db8::7 2001:db8::25 40002 25"),
                ("2001:db8::7", 40002), ("2001:db8::25", 25)),
    "v2-tcp4-with-tlv": (v2_tcp4("127.0.0.77", "127.0.0.88", 40003, 25, tlvs=b"\x04\x00\x01z"),
                         ("127.0.0.77", 40003), ("127.0.0.88", 25)),
    "v2-tcp6-mapped": (v2_tcp6("::ffff:127.0.0.79", "2001:db8::25", 40004, 587),
                       ("127.0.0.79", 40004), ("2001:db8::25", 587)),
}  # fmt: skip


@pytest.mark.parametrize(("header", "remote", "local"), ACCEPTED.values(), ids=ACCEPTED.keys())
@pytest_twisted.ensureDeferred
async def test_header_sets_addresses_and_pipelined_early_talk_is_kept(
    qpconn_server, tmp_path, header, remote, local
):
    server, rec = start(qpconn_server, tmp_path)
    early = (
        b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<user@mx.test>\r\nDATA\r\n"
    )

    def client() -> list[int]:
        # Header and the whole envelope in one write, before any banner.
        with BoundClient(server.address, preamble=header + early) as c:
            codes = [c.greeting.code] + [r.code for r in c.replies(4)]
            codes.append(c.message(MESSAGE).code)
            codes.append(c.cmd("QUIT").code)
        return codes

    assert await in_thread(client) == [220, 250, 250, 250, 354, 250, 221]
    (seen,) = rec.seen
    assert (seen.remote_ip, seen.remote_port) == remote
    assert (seen.local_ip, seen.local_port) == local
    ip = remote[0] if ":" not in remote[0] else "IPv6:" + remote[0]
    assert received_line(server.messages()[0]) == (
        b"Received: from client.test (unknown [%s])" % ip.encode()
    )


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(v2(0, 0x00), id="v2-local"),
        pytest.param(v2(0, 0x11, v2_addresses("127.0.0.9", "127.0.0.9", 1, 2)), id="v2-local-addr"),
        pytest.param(v1("PROXY UNKNOWN"), id="v1-unknown"),
        pytest.param(v1("PROXY UNKNOWN 127.0.0.9 127.0.0.9 1 2"), id="v1-unknown-junk"),
        pytest.param(v2(1, 0x00), id="v2-proxy-unspec"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_local_unknown_and_unspec_keep_the_real_peer(qpconn_server, tmp_path, header):
    server, rec = start(qpconn_server, tmp_path)

    def client() -> tuple[int, int]:
        with BoundClient(server.address, "127.0.0.3", preamble=header) as c:
            port = c.sock.getsockname()[1]
            assert c.cmd("QUIT").code == 221
            return c.greeting.code, port

    code, port = await in_thread(client)
    assert code == 220
    (seen,) = rec.seen
    assert (seen.remote_ip, seen.remote_port) == ("127.0.0.3", port)
    assert (seen.local_ip, seen.local_port) == server.address


@pytest.mark.parametrize("version", [1, 2])
@pytest_twisted.ensureDeferred
async def test_fragmented_header_gets_no_banner_until_complete(qpconn_server, tmp_path, version):
    server, rec = start(qpconn_server, tmp_path)
    header = (
        v1("PROXY TCP4 127.0.0.77 127.0.0.1 40005 25")
        if version == 1
        else v2_tcp4("127.0.0.77", "127.0.0.1", 40005, 25)
    )

    def client() -> bytes:
        with socket.create_connection(server.address, timeout=3) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for index in range(len(header) - 1):  # bounded: one byte per round
                sock.sendall(header[index : index + 1])
                time.sleep(0.005)
            sock.settimeout(0.2)
            try:
                early = sock.recv(4096)
            except TimeoutError:
                early = b""
            assert early == b"", f"banner before the header was complete: {early!r}"
            sock.settimeout(3)
            sock.sendall(header[-1:] + b"QUIT\r\n")
            data = b""
            while b"221 " not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data

    data = await in_thread(client)
    assert data.startswith(b"220 ") and b"\r\n221 " in data
    assert rec.seen[0].remote_ip == "127.0.0.77"


# -- headers that are refused ---------------------------------------------------------------

MALFORMED = [
    pytest.param(b"EHLO client.test\r\n", id="smtp-instead-of-header"),
    pytest.param(b"PROXY TCP5 127.0.0.1 127.0.0.1 1 2\r\n", id="v1-bad-protocol"),
    pytest.param(b"PROXY TCP4 127.0.0.1 127.0.0.1 65536 25\r\n", id="v1-port-out-of-range"),
    pytest.param(b"PROXY TCP4 127.0.0.1 127.0.0.1 025 25\r\n", id="v1-port-leading-zero"),
    pytest.param(b"PROXY TCP4 ::1 127.0.0.1 1 25\r\n", id="v1-family-mismatch"),
    pytest.param(b"PROXY TCP4 127.0.0.1  127.0.0.1 1 25\r\n", id="v1-double-space"),
    pytest.param(b"PROXY TCP4 127.0.0.1 127.0.0.1 1 25\n", id="v1-bare-lf"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 120, id="v1-over-long-line"),
    pytest.param(b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + b"\x00" * 12, id="v2-bad-signature"),
    pytest.param(v2(1, 0x11, b"\x00" * 12, version=1), id="v2-bad-version"),
    pytest.param(v2(2, 0x11, b"\x00" * 12), id="v2-bad-command"),
    pytest.param(v2(1, 0x12, b"\x00" * 12), id="v2-bad-family-udp"),
    pytest.param(v2(1, 0x41, b"\x00" * 12), id="v2-bad-family-unknown"),
    pytest.param(v2(1, 0x11, b"\x00" * 4), id="v2-truncated-address-block"),
    pytest.param(
        v2_tcp4("127.0.0.1", "127.0.0.1", 1, 25, tlvs=b"\x04\x00\x09ab"), id="v2-truncated-tlv"
    ),
    pytest.param(
        V2_SIGNATURE + b"\x21\x11\xff\xff" + b"\x00" * 12, id="v2-declared-length-too-large"
    ),
]


@pytest.mark.parametrize("payload", MALFORMED)
@pytest_twisted.ensureDeferred
async def test_malformed_header_closes_with_nothing_processed(
    qpconn_server, tmp_path, refusals, payload
):
    server, rec = start(qpconn_server, tmp_path)
    received, _ = await in_thread(closed_silently, server.address, payload)
    await server.wait_sessions_closed()
    assert received == b""
    assert rec.calls == [] and rec.seen == []
    assert server.messages() == []
    assert len(refusals) == 1 and "bad PROXY header" in refusals[0]["reason"]


@pytest_twisted.ensureDeferred
async def test_untrusted_peer_is_refused_even_with_a_valid_header(
    qpconn_server, tmp_path, refusals
):
    proxy = ProxySettings(enabled=True, trusted=["127.0.0.1/32", "::1"])
    server, rec = start(qpconn_server, tmp_path, proxy)
    header = v1("PROXY TCP4 127.0.0.77 127.0.0.1 40006 25") + b"EHLO client.test\r\n"
    received, _ = await in_thread(closed_silently, server.address, header, "127.0.0.2")
    await server.wait_sessions_closed()
    assert received == b""
    assert rec.calls == []
    (event,) = refusals
    assert "not a trusted proxy" in event["reason"] and event["remote_ip"] == "127.0.0.2"

    # The trusted balancer itself still gets through.
    def trusted() -> int:
        with BoundClient(server.address, "127.0.0.1", preamble=header) as c:
            return c.reply().code

    assert await in_thread(trusted) == 250
    assert rec.seen[0].remote_ip == "127.0.0.77"


@pytest_twisted.ensureDeferred
async def test_incomplete_header_times_out_after_config_proxy_timeout(
    qpconn_server, tmp_path, refusals
):
    server, rec = start(qpconn_server, tmp_path, files={"proxy_timeout": "0.3"})
    assert server.factory.proxy.timeout == 0.3
    # A v2 header announcing 12 address bytes and sending 4: truncated, then silence.
    received, elapsed = await in_thread(
        closed_silently, server.address, v2(1, 0x11, b"\x00" * 12)[:-8]
    )
    await server.wait_sessions_closed()
    assert received == b""
    # config's 0.3 s, not the 5 s default
    assert_within_timeout(elapsed, fired=0.3, instead_of=5.0)
    assert rec.calls == []
    assert len(refusals) == 1 and "in time" in refusals[0]["reason"]


@pytest_twisted.ensureDeferred
async def test_client_hanging_up_mid_header_runs_no_hooks(qpconn_server, tmp_path, refusals):
    server, rec = start(qpconn_server, tmp_path)

    def client() -> None:
        with socket.create_connection(server.address, timeout=3) as sock:
            sock.sendall(b"PROXY TCP4 127.0.0.")

    await in_thread(client)
    await server.wait_sessions_closed()
    assert not server.factory.sessions
    assert rec.calls == []
    assert refusals == []


# -- PROXY header and lookups -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lookups_are_about_the_proxied_client_not_the_balancer(qpconn_server, tmp_path):
    dns: DNSTestServer = start_dns_server(ZONE)
    try:
        # a lookup that answers must never meet its timeout, however slow the machine
        lookups = LookupSettings(dns_servers=[dns.address], dns_timeout=30)
        server, rec = start(qpconn_server, tmp_path, lookups=lookups)
        header = v2_tcp4("127.0.0.21", "127.0.0.1", 40007, 25)

        def client() -> int:
            with BoundClient(server.address, preamble=header) as c:
                assert c.cmd("EHLO client.test").code == 250
                code = c.transaction("<a@example.org>", ["<user@mx.test>"], MESSAGE).code
                c.cmd("QUIT")
                return code

        assert await in_thread(client) == 250
    finally:
        await dns.stop()
    (seen,) = rec.seen
    assert (seen.remote_ip, seen.remote_host, seen.remote_host_verified) == (
        "127.0.0.21",
        "good.test",
        True,
    )
    assert dns.count(rev("127.0.0.1")) == 0  # the balancer's own address was never asked
    assert received_line(server.messages()[0]) == (
        b"Received: from client.test (good.test [127.0.0.21])"
    )


# -- options and .tac settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "enabled", "trusted", "untrusted"),
    [
        pytest.param(
            ["--proxy-protocol"],
            True,
            ["127.0.0.5", "::1", "::ffff:127.0.0.1"],
            ["192.0.2.1", "::2"],
            id="loopback-by-default",
        ),
        pytest.param(
            ["--proxy-from", "192.0.2.0/24", "--proxy-from", "2001:db8::1"],
            True,
            ["192.0.2.200", "2001:db8::1"],
            ["127.0.0.1", "2001:db8::2"],
            id="proxy-from-repeatable-implies-protocol",
        ),
        pytest.param([], False, [], [], id="off-by-default"),
    ],
)
def test_proxy_options(argv, enabled, trusted, untrusted):
    options = Options()
    options.parseOptions(argv)
    settings = proxy_settings(options)
    assert settings.enabled is enabled
    assert all(settings.trusts(ip) for ip in trusted)
    assert not any(settings.trusts(ip) for ip in untrusted)


def test_bad_proxy_from_is_a_usage_error():
    with pytest.raises(usage.UsageError, match="--proxy-from"):
        Options().parseOptions(["--proxy-from", "300.1.1.1/8"])
    with pytest.raises(ValueError):
        ProxySettings(enabled=True, trusted=["not-a-network"])


def test_options_reach_the_factory_and_config_timeout_applies(tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "proxy_timeout").write_text("2.5\n")
    options = Options()
    options.parseOptions(["--proxy-from", "192.0.2.9", "--config", str(config), "--listen=tcp:0"])
    factory = makeService(options).factory  # type: ignore[attr-defined]
    assert factory.proxy.enabled and factory.proxy.timeout == 2.5
    assert factory.proxy.trusts("192.0.2.9") and not factory.proxy.trusts("127.0.0.1")
    assert make_factory(None, plugins=[], proxy=ProxySettings(True)).proxy.timeout == 5.0
    assert not make_factory(None, plugins=[]).proxy.enabled


def test_tac_files_set_the_policy_from_python():
    policy = ProxySettings(enabled=True, trusted=["198.51.100.0/24"], timeout=1.5)
    top = make_service(["tcp:0:interface=127.0.0.1"], plugins=[], proxy=policy)
    assert top.factory.proxy.timeout == 1.5  # type: ignore[attr-defined]
    assert top.factory.proxy.trusts("198.51.100.7")  # type: ignore[attr-defined]
