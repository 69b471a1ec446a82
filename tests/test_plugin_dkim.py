"""dkim end to end: messages signed by dkimpy in the test with a key made at test time,
whose public half the test's loopback DNS server serves; and signing of our own mail."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import dkim as dkimpy
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.e2e_client import watch_errors
from tests.support.dkimkey import key_record
from tests.support.dnsserver import DNSTestServer, start_dns_server
from tests.support.mail import auth_results, header_fields
from tests.support.policy import lookups, script, send_message, sessions_plugin
from tests.support.server import in_thread


def make_key() -> tuple[bytes, str]:
    """(PEM private key, base64 DER public key for ``p=``), made now: it guards nothing."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(public).decode("ascii")


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[bytes, str]]:
    return {"good": make_key(), "other": make_key()}


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest_twisted.async_yield_fixture
async def dns(keys) -> AsyncIterator[DNSTestServer]:
    zone = {
        "sel._domainkey.example.org": [("TXT", key_record(keys["good"][1]))],
        "wrong._domainkey.example.org": [("TXT", key_record(keys["other"][1]))],
        "revoked._domainkey.example.org": [("TXT", "v=DKIM1; k=rsa; p=")],
        "sel._domainkey.second.example": [("TXT", key_record(keys["good"][1]))],
    }
    srv = start_dns_server(
        zone, servfail={"sf._domainkey.example.org"}, hang={"hang._domainkey.example.org"}
    )
    yield srv
    await srv.stop()


BODY = (
    b"From: Alice <alice@example.org>\r\nTo: user@mx.test\r\nSubject: signed\r\n"
    b"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\n\r\nHello,\r\nthis is signed.\r\n"
)


def signed(private: bytes, selector: str = "sel", domain: str = "example.org",
           text: bytes = BODY) -> bytes:  # fmt: skip
    field = dkimpy.sign(text, selector.encode(), domain.encode(), private,
                        include_headers=[b"from", b"to", b"subject", b"date"])  # fmt: skip
    return field + text


def start(qpconn_server: Any, dns: DNSTestServer, line: str = "dkim", **kw: Any) -> Any:
    recorder = sessions_plugin()
    server = qpconn_server(
        plugins=["relay", "rcpt_ok", line, "queue/maildir maildir", recorder],
        lookups=lookups(dns),
        files={"relayclients": ["127.0.0.3"], **kw.get("files", {})},
    )
    server.extra["sessions"] = recorder
    return server


async def deliver(server: Any, text: bytes, source: str = "127.0.0.2") -> Any:
    replies = await in_thread(
        send_message, server.address, source, "alice@example.org", "user@mx.test", text
    )
    await server.wait_sessions_closed()
    return replies[-1]


@pytest_twisted.ensureDeferred
async def test_a_good_signature_passes(qpconn_server, dns, keys):
    server = start(qpconn_server, dns)
    assert (await deliver(server, signed(keys["good"][0]))).code == 250
    (message,) = server.messages()
    assert auth_results(message) == (
        b"Authentication-Results: mx.test; dkim=pass reason=\"signature verified\""
        b" header.d=example.org header.s=sel"
    )
    (verdict,) = server.extra["sessions"].of("dkim")
    assert verdict["result"] == "pass" and verdict["reason"].startswith("d=example.org")


TAMPER = [
    (lambda m: m.replace(b"this is signed.", b"this is NOT signed."), "fail", "body hash"),
    (lambda m: m.replace(b"Subject: signed", b"Subject: changed"), "fail", ""),
]


@pytest.mark.parametrize(("tamper", "result", "reason"), TAMPER)
@pytest_twisted.ensureDeferred
async def test_tampered_messages_fail(qpconn_server, dns, keys, tamper, result, reason):
    server = start(qpconn_server, dns)
    assert (await deliver(server, tamper(signed(keys["good"][0])))).code == 250
    value = auth_results(server.messages()[0])
    assert f"dkim={result}".encode() in value and reason.encode() in value


@pytest.mark.parametrize(
    ("selector", "result"),
    [("wrong", "fail"), ("missing", "permerror"), ("revoked", "permerror"),
     ("sf", "temperror"), ("hang", "temperror")],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_key_problems(qpconn_server, dns, keys, selector, result):
    server = start(qpconn_server, dns)
    assert (await deliver(server, signed(keys["good"][0], selector))).code == 250
    value = auth_results(server.messages()[0])
    assert value.startswith(b"Authentication-Results: mx.test; dkim=" + result.encode())
    assert f"header.s={selector}".encode() in value
    if selector == "revoked":  # dkimpy alone would call this a failed signature
        assert b"revoked (empty p=)" in value


@pytest_twisted.ensureDeferred
async def test_unsigned_mail_and_several_signatures(qpconn_server, dns, keys):
    server = start(qpconn_server, dns)
    assert (await deliver(server, BODY)).code == 250
    assert auth_results(server.messages()[0]) == b"Authentication-Results: mx.test; dkim=none"
    twice = signed(keys["good"][0], "sel", "second.example", signed(keys["good"][0], "wrong"))
    assert (await deliver(server, twice)).code == 250
    value = auth_results(server.messages()[1])
    assert b"dkim=pass" in value and b"header.d=second.example" in value
    assert b"dkim=fail" in value and b"header.s=wrong" in value


@pytest_twisted.ensureDeferred
async def test_reject_1_refuses_mail_without_a_passing_signature(qpconn_server, dns, keys):
    server = start(qpconn_server, dns, "dkim reject 1")
    reply = await deliver(server, signed(keys["good"][0], "wrong"))
    assert (reply.code, reply.text) == (552, "5.7.20 No passing DKIM signature found")
    reply = await deliver(server, signed(keys["good"][0], "sf"))
    assert reply.code == 452 and reply.text.startswith("4.4.3 DKIM signature could not be checked")
    assert (await deliver(server, signed(keys["good"][0]))).code == 250
    assert (await deliver(server, BODY)).code == 250  # unsigned: nothing to refuse


def verify(message: bytes, public: str) -> bool:
    """Check a stored message's signature as a receiving server would: a Maildir file's
    LF line endings are CRLF again on the wire, where the signature was made."""
    head, _, body = message.partition(b"\n\n")
    fields = [f for f in head.split(b"\n") if not f.startswith((b"Return-Path", b"Delivered"))]
    text = b"\r\n".join(fields) + b"\r\n\r\n" + body.replace(b"\n", b"\r\n")
    return dkimpy.verify(text, dnsfunc=lambda name, timeout=5: key_record(public).encode())


@pytest_twisted.ensureDeferred
async def test_mail_from_relay_clients_is_signed_with_the_domains_key(
    qpconn_server, dns, keys, tmp_path
):
    server = start(qpconn_server, dns)
    folder = tmp_path / "config" / "dkim" / "example.org"
    os.makedirs(folder)
    (folder / "private").write_bytes(keys["good"][0])
    (folder / "selector").write_text("# the selector\nsel\n")
    assert (await deliver(server, BODY, source="127.0.0.3")).code == 250
    message = server.messages()[0]
    first = header_fields(message)[0]
    assert first.startswith(b"DKIM-Signature: ") and b"d=example.org" in first
    assert b"s=sel" in first
    assert verify(message, keys["good"][1])
    assert not verify(message.replace(b"this is signed", b"this is forged"), keys["good"][1])
    # a subdomain is signed with its parent's key; a domain without a key is not signed
    sub = BODY.replace(b"alice@example.org", b"alice@mail.example.org")
    assert (await deliver(server, sub, source="127.0.0.3")).code == 250
    assert b"d=example.org" in header_fields(server.messages()[1])[0]
    other = BODY.replace(b"alice@example.org", b"alice@elsewhere.example")
    assert (await deliver(server, other, source="127.0.0.3")).code == 250
    assert not header_fields(server.messages()[2])[0].startswith(b"DKIM-Signature")
    assert server.extra["sessions"].of("dkim")[0]["reason"] == "no key for elsewhere.example"


@pytest_twisted.ensureDeferred
async def test_mail_from_authenticated_users_is_signed(qpconn_server, dns, keys, tmp_path):
    from qpconn.plugins.auth.flat_file import hash_password

    recorder = sessions_plugin()
    server = qpconn_server(
        plugins=["auth/flat_file", "rcpt_ok", "dkim", "queue/maildir maildir", recorder],
        lookups=lookups(dns),
        files={"tls_before_auth": "0",
               "flat_auth_pw": [f"alice:{hash_password('secret', log2n=4)}"]},
    )  # fmt: skip
    folder = tmp_path / "config" / "dkim" / "example.org"
    os.makedirs(folder)
    (folder / "private").write_bytes(keys["good"][0])
    (folder / "selector").write_text("sel\n")
    plain = base64.b64encode(b"\0alice\0secret").decode("ascii")
    commands = ["EHLO c.test", f"AUTH PLAIN {plain}", "MAIL FROM:<alice@example.org>",
                "RCPT TO:<bob@elsewhere.example>", "DATA", BODY]  # fmt: skip
    replies = await in_thread(script, server.address, "127.0.0.2", commands)
    assert [r.code for r in replies] == [220, 250, 235, 250, 250, 354, 250]
    (message,) = server.messages()
    assert header_fields(message)[0].startswith(b"DKIM-Signature: ")
    assert verify(message, keys["good"][1])
