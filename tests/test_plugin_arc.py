"""arc end to end: chains sealed by dkimpy in the test and by a first qpconn hop that
forwards to a second with queue/smtp-forward; every key lookup goes to the test's own
loopback DNS server. A message whose body changed after sealing must give arc=fail."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.hooks.plugin import PluginLoadError
from qpconn.testing import load_listed_plugins
from tests.e2e_client import watch_errors
from tests.support.dkimkey import PRIVATE_KEY, key_record
from tests.support.dnsserver import DNSTestServer, start_dns_server
from tests.support.mail import auth_results, header_fields
from tests.support.policy import lookups, send_message
from tests.support.server import in_thread, start_server

BODY = (
    b"From: Alice <alice@example.org>\r\nTo: user@mx.test\r\nSubject: sealed\r\n"
    b"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-ID: <arc-1@example.org>\r\n"
    b"\r\nHello,\r\nthis message was forwarded.\r\n"
)


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest_twisted.async_yield_fixture
async def dns() -> AsyncIterator[DNSTestServer]:
    zone = {
        "arc1._domainkey.sealer.example": [("TXT", key_record())],
        "hop1._domainkey.hop1.example": [("TXT", key_record())],
    }
    srv = start_dns_server(zone, servfail={"sf._domainkey.sealer.example"})
    yield srv
    await srv.stop()


def sealed_by_dkimpy(text: bytes = BODY, selector: bytes = b"arc1") -> bytes:
    """``text`` as a forwarder called sealer.example would pass it on: its results, sealed."""
    results = b"Authentication-Results: sealer.example; spf=pass smtp.mailfrom=a@example.org\r\n"
    with_results = results + text
    fields = dkimpy.arc_sign(with_results, selector, b"sealer.example", PRIVATE_KEY,
                             b"sealer.example")  # fmt: skip
    return b"".join(fields) + with_results


def receiver_verdict(message: bytes) -> bytes:
    """What a receiver after us makes of the chain (dkimpy, the test's key).

    The Maildir stores LF line endings: the message is put back into its wire form first.
    """
    wire = message.replace(b"\n", b"\r\n")
    fields = [f for f in wire.split(b"\r\n\r\n", 1)[0].split(b"\r\n")]
    head = [f for f in fields if not f.startswith((b"Return-Path", b"Delivered-To"))]
    text = b"\r\n".join(head) + b"\r\n\r\n" + wire.split(b"\r\n\r\n", 1)[1]
    cv, _, _ = dkimpy.arc_verify(text, dnsfunc=lambda name, timeout=5: key_record().encode())
    return cv


def seals(message: bytes) -> list[bytes]:
    """The ARC-Seal fields, topmost (newest) first."""
    return [f for f in header_fields(message) if f.startswith(b"ARC-Seal:")]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Any]:
    """Call with (name, plugin lines, files, dns) for a qpconn under tmp_path/name."""
    started: list[Any] = []

    def start(name: str, plugins: list[str], files: dict[str, Any], dns: DNSTestServer) -> Any:
        # each its own Maildir (the server's default, tmp_path/name/maildir)
        maildir = f"queue/maildir {tmp_path / name / 'maildir'}"
        plugins = [maildir if line == "queue/maildir" else line for line in plugins]
        server = start_server(tmp_path / name, plugins=plugins, files=files, lookups=lookups(dns))
        started.append(server)
        return server

    yield start
    for server in started:
        pytest_twisted.blockon(server.stop())
        pytest_twisted.blockon(server.wait_sessions_closed())


def final_hop(servers: Any, dns: DNSTestServer) -> Any:
    return servers("final", ["relay", "rcpt_ok", "arc", "queue/maildir"], {}, dns)


def forwarding_hop(servers: Any, dns: DNSTestServer, tmp_path: Path, next_port: int) -> Any:
    key = tmp_path / "hop1" / "config" / "arc" / "hop1.pem"
    key.parent.mkdir(parents=True)
    key.write_bytes(PRIVATE_KEY)
    plugins = [
        "relay",
        "rcpt_ok",
        "arc sign selector=hop1 domain=hop1.example key=arc/hop1.pem",
        f"queue/smtp-forward 127.0.0.1 {next_port} idle=0.1",
    ]
    return servers("hop1", plugins, {"me": "hop1.example", "rcpthosts": ["mx.test"]}, dns)


async def deliver(server: Any, text: bytes) -> Any:
    replies = await in_thread(
        send_message, server.address, "127.0.0.2", "alice@example.org", "user@mx.test", text
    )
    await server.wait_sessions_closed()
    return replies[-1]


# -- verifying -------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_chain_sealed_by_dkimpy_passes_and_a_changed_body_fails(servers, dns):
    server = final_hop(servers, dns)
    assert (await deliver(server, sealed_by_dkimpy())).code == 250
    changed = sealed_by_dkimpy().replace(b"was forwarded", b"was changed")
    assert (await deliver(server, changed)).code == 250
    assert (await deliver(server, BODY)).code == 250
    good, bad, unsealed = server.messages()
    assert auth_results(good) == (
        b'Authentication-Results: mx.test; arc=pass reason="success" smtp.remote-ip=127.0.0.2'
    )
    value = auth_results(bad)
    assert value.startswith(b"Authentication-Results: mx.test; arc=fail")
    assert b"ARC-Message-Signature did not validate" in value
    assert auth_results(unsealed) == (
        b"Authentication-Results: mx.test; arc=none smtp.remote-ip=127.0.0.2"
    )


@pytest_twisted.ensureDeferred
async def test_a_key_that_cannot_be_fetched_fails_the_chain_and_says_why(servers, dns):
    server = final_hop(servers, dns)
    assert (await deliver(server, sealed_by_dkimpy(selector=b"sf"))).code == 250
    value = auth_results(server.messages()[0])
    assert value.startswith(b"Authentication-Results: mx.test; arc=fail")
    assert b"temporary DNS failure (servfail) at sf._domainkey.sealer.example" in value


# -- sealing ---------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_forwarding_hop_seals_and_the_next_hop_verifies(servers, dns, tmp_path):
    final = final_hop(servers, dns)
    hop1 = forwarding_hop(servers, dns, tmp_path, final.address[1])
    assert (await deliver(hop1, BODY)).code == 250
    assert (await deliver(hop1, sealed_by_dkimpy())).code == 250
    changed = sealed_by_dkimpy().replace(b"was forwarded", b"was changed")
    assert (await deliver(hop1, changed)).code == 250
    await final.wait_sessions_closed()
    first, second, broken = final.messages()
    # hop1 saw no chain: it seals i=1 with cv=none and its own results
    # (on top of them: the final hop's Authentication-Results and Received)
    arc_set = [f for f in header_fields(first) if f.startswith(b"ARC-")]
    assert arc_set[0].startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=hop1.example; s=hop1;")
    assert arc_set[1].startswith(b"ARC-Message-Signature: i=1;")
    assert arc_set[2] == (
        b"ARC-Authentication-Results: i=1; hop1.example; arc=none smtp.remote-ip=127.0.0.2"
    )
    assert auth_results(first).startswith(b"Authentication-Results: mx.test; arc=pass")
    assert b"smtp.remote-ip=127.0.0.1" in auth_results(first)  # hop1 connected to us
    # a dkimpy chain that hop1 found intact: hop1 adds i=2 cv=pass; the whole chain holds
    assert seals(second)[0].startswith(b"ARC-Seal: i=2; cv=pass; a=rsa-sha256; d=hop1.example")
    assert auth_results(second).startswith(b"Authentication-Results: mx.test; arc=pass")
    assert receiver_verdict(first) == receiver_verdict(second) == b"pass"
    # the changed body: hop1 seals with cv=fail, and the chain ends there for everyone after
    assert seals(broken)[0].startswith(b"ARC-Seal: i=2; cv=fail;")
    assert auth_results(broken).startswith(b"Authentication-Results: mx.test; arc=fail")
    assert receiver_verdict(broken) != b"pass"


@pytest_twisted.ensureDeferred
async def test_mail_stored_here_is_sealed_only_with_seal_always(servers, dns, tmp_path):
    key = tmp_path / "key.pem"
    key.write_bytes(PRIVATE_KEY)
    line = f"arc sign selector=hop1 domain=hop1.example key={key}"
    local = servers("local", ["relay", "rcpt_ok", line, "queue/maildir"], {}, dns)
    always = servers("always", ["relay", "rcpt_ok", f"{line} seal=always", "queue/maildir"], {},
                     dns)  # fmt: skip
    assert (await deliver(local, BODY)).code == 250
    assert (await deliver(always, BODY)).code == 250
    assert not any(f.startswith(b"ARC-") for f in header_fields(local.messages()[0]))
    sealed = always.messages()[0]
    assert seals(sealed)[0].startswith(b"ARC-Seal: i=1; cv=none;")
    assert receiver_verdict(sealed) == b"pass"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("arc seal", "arguments are 'sign selector=S domain=D key=FILE'"),
        ("arc sign selector=s domain=d.example", "sign needs key"),
        ("arc sign selector=s domain=d.example key=k.pem seal=never", "seal must be forward"),
        ("arc sign selector=s domain=d.example key=k.pem colour=blue", "unknown or empty"),
        ("arc sign selector=s domain=d.example key=not-a-key.pem", "not a PEM RSA private key"),
    ],
)
def test_bad_arguments_stop_the_server(tmp_path, line, problem):
    (tmp_path / "k.pem").write_bytes(PRIVATE_KEY)
    (tmp_path / "not-a-key.pem").write_text("hello\n")
    with pytest.raises(PluginLoadError, match=problem):
        load_listed_plugins(Config(str(tmp_path)), [line])
