"""dmarc end to end: SPF (pyspf) and DKIM (dkimpy) results against DMARC records, all
served by a real loopback DNS server, through a real qpconn."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import dkim as dkimpy
import pytest
import pytest_twisted

from qpconn.kit import psl
from qpconn.plugins.dmarc import aligned, ascii_domain
from tests.e2e_client import watch_errors
from tests.support.dkimkey import PRIVATE_KEY, key_record
from tests.support.dnsserver import DNSTestServer, start_dns_server
from tests.support.mail import auth_results, header_fields
from tests.support.policy import lookups, send_message, sessions_plugin
from tests.support.server import in_thread

SPF_PASS = ("TXT", "v=spf1 ip4:127.0.0.0/8 -all")
ZONE: dict[str, list[tuple[Any, ...]]] = {
    "reject.test": [SPF_PASS],
    "_dmarc.reject.test": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@reject.test")],
    "mail.reject.test": [SPF_PASS],
    "sel._domainkey.reject.test": [("TXT", key_record())],
    "other.test": [SPF_PASS],
    "sel._domainkey.other.test": [("TXT", key_record())],
    "strict.test": [SPF_PASS],
    "mail.strict.test": [SPF_PASS],
    "_dmarc.strict.test": [("TXT", "v=DMARC1; p=reject; aspf=s; adkim=s")],
    "sel._domainkey.strict.test": [("TXT", key_record())],
    "quarantine.test": [("TXT", "v=DMARC1; p=quarantine")],
    "_dmarc.quarantine.test": [("TXT", "v=DMARC1; p=quarantine")],
    "_dmarc.none.test": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.sampled.test": [("TXT", "v=DMARC1; p=reject; pct=0")],
    "_dmarc.org.co.test": [("TXT", "v=DMARC1; p=none; sp=reject")],
    "_dmarc.twice.test": [("TXT", "v=DMARC1; p=reject"), ("TXT", "v=DMARC1; p=none")],
    "_dmarc.broken.test": [("TXT", "v=DMARC1; p=whatever")],
    # bücher.test, as DNS knows it
    "xn--bcher-kva.test": [SPF_PASS],
    "_dmarc.xn--bcher-kva.test": [("TXT", "v=DMARC1; p=reject")],
    "sel._domainkey.xn--bcher-kva.test": [("TXT", key_record())],
}
#: a small Public Suffix List: co.test is a public suffix, as co.uk is
SUFFIXES = ["// test list", "test", "co.test", "*.wild.test", "!www.wild.test"]


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest_twisted.async_yield_fixture
async def dns() -> AsyncIterator[DNSTestServer]:
    srv = start_dns_server(ZONE, servfail={"_dmarc.sf.test"}, hang={"_dmarc.hang.test"})
    yield srv
    await srv.stop()


def start(qpconn_server: Any, dns: DNSTestServer, tmp_path: Any, line: str = "dmarc") -> Any:
    (tmp_path / "suffixes.dat").write_text("\n".join(SUFFIXES) + "\n")
    recorder = sessions_plugin()
    server = qpconn_server(
        plugins=["sender_permitted_from reject 0", "relay", "rcpt_ok", "dkim", line,
                 "queue/maildir maildir", recorder],
        lookups=lookups(dns),
        files={"public_suffix_list": str(tmp_path / "suffixes.dat"),
               "relayclients": ["127.0.0.9"]},
    )  # fmt: skip
    server.extra["sessions"] = recorder
    return server


def text(author: str, signer: str | None = None) -> bytes:
    body = (f"From: <a@{author}>\r\nTo: u@mx.test\r\nSubject: dmarc\r\n\r\nhello\r\n").encode()
    if signer is None:
        return body
    return dkimpy.sign(body, b"sel", signer.encode(), PRIVATE_KEY) + body


async def deliver(server: Any, sender: str, message: bytes, source: str = "127.0.0.2") -> Any:
    replies = await in_thread(send_message, server.address, source, sender, "u@mx.test", message)
    await server.wait_sessions_closed()
    return replies[-1]


CASES = [
    # (envelope sender, From domain, DKIM signer, result, reply code)
    ("a@reject.test", "reject.test", None, "pass", 250),  # aligned SPF
    ("b@other.test", "reject.test", None, "fail", 550),  # SPF passes, not aligned
    ("b@other.test", "reject.test", "reject.test", "pass", 250),  # aligned DKIM
    ("b@other.test", "reject.test", "other.test", "fail", 550),  # DKIM passes, not aligned
    ("a@mail.reject.test", "reject.test", None, "pass", 250),  # relaxed: same org domain
    ("a@mail.strict.test", "strict.test", None, "fail", 550),  # strict SPF alignment
    ("a@nowhere.test", "mail.strict.test", "strict.test", "fail", 550),  # strict DKIM
    ("a@strict.test", "strict.test", None, "pass", 250),
    ("a@nowhere.test", "quarantine.test", None, "fail", 250),
    ("a@nowhere.test", "none.test", None, "fail", 250),
    ("a@nowhere.test", "nodmarc.test", None, "none", 250),
    ("a@nowhere.test", "sub.org.co.test", None, "fail", 550),  # sp= of the org domain
    ("a@nowhere.test", "org.co.test", None, "fail", 250),  # p=none for the org itself
    ("a@nowhere.test", "co.test", None, "none", 250),  # a public suffix: no parent asked
    ("a@nowhere.test", "sampled.test", None, "fail", 250),  # pct=0: quarantined instead
    ("a@nowhere.test", "twice.test", None, "none", 250),
    ("a@nowhere.test", "broken.test", None, "none", 250),
    ("a@nowhere.test", "sf.test", None, "temperror", 452),
    ("a@nowhere.test", "hang.test", None, "temperror", 452),
]


@pytest.mark.parametrize(("sender", "author", "signer", "result", "code"), CASES)
@pytest_twisted.ensureDeferred
async def test_dmarc(qpconn_server, dns, tmp_path, sender, author, signer, result, code):
    server = start(qpconn_server, dns, tmp_path)
    reply = await deliver(server, sender, text(author, signer))
    assert reply.code == code, reply
    (verdict,) = server.extra["sessions"].of("dmarc")
    assert verdict["result"] == result
    if code == 550:
        assert reply.text == f"5.7.1 Unauthenticated mail from {author} refused by its DMARC policy"
        assert server.messages() == []
        return
    if code == 452:
        assert reply.text.startswith(f"4.7.1 DMARC policy of {author} could not be found")
        return
    (message,) = server.messages()
    assert f"dmarc={result}".encode() in auth_results(message)
    assert f"header.from={author}".encode() in auth_results(message)
    quarantined = b"X-Quarantine: DMARC policy of " + author.encode()
    expected = verdict.get("action") == "quarantine"
    assert (quarantined in header_fields(message)) is expected
    assert expected is (author in ("quarantine.test", "sampled.test"))


@pytest_twisted.ensureDeferred
async def test_one_header_with_every_method_and_the_org_domain_asked_once(
    qpconn_server, dns, tmp_path
):
    server = start(qpconn_server, dns, tmp_path)
    reply = await deliver(server, "a@mail.reject.test", text("mail.reject.test", "reject.test"))
    assert reply.code == 250
    value = auth_results(server.messages()[0])
    assert value.startswith(b"Authentication-Results: mx.test; spf=pass")
    assert b"dkim=pass" in value and b"dmarc=pass reason=\"p=reject\"" in value
    assert dns.count("_dmarc.mail.reject.test") == 1 and dns.count("_dmarc.reject.test") == 1


@pytest_twisted.ensureDeferred
async def test_reject_0_records_only_and_relay_clients_are_skipped(qpconn_server, dns, tmp_path):
    server = start(qpconn_server, dns, tmp_path, "dmarc reject 0")
    assert (await deliver(server, "b@other.test", text("reject.test"))).code == 250
    assert server.extra["sessions"].of("dmarc")[0]["result"] == "fail"
    assert (await deliver(server, "b@other.test", text("sf.test"))).code == 250
    server = start(qpconn_server, dns, tmp_path)
    assert (await deliver(server, "b@other.test", text("reject.test"), "127.0.0.9")).code == 250
    assert server.extra["sessions"].of("dmarc")[0]["result"] == "skip"


IDN = "xn--bcher-kva.test"


@pytest.mark.parametrize(
    ("sender", "signer", "code"),
    [(f"a@{IDN}", None, 250), ("a@other.test", IDN, 250), ("a@other.test", None, 550),
     ("a@other.test", "other.test", 550)],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_internationalized_from_domain_through_its_a_label(
    qpconn_server, dns, tmp_path, sender, signer, code
):
    server = start(qpconn_server, dns, tmp_path)
    reply = await deliver(server, sender, text("Bücher.test", signer))
    assert reply.code == code, reply
    (verdict,) = server.extra["sessions"].of("dmarc")
    assert verdict["result"] == ("pass" if code == 250 else "fail")
    assert dns.count(f"_dmarc.{IDN}") == 1
    if code == 550:
        assert reply.text == f"5.7.1 Unauthenticated mail from {IDN} refused by its DMARC policy"
        return
    (message,) = server.messages()
    assert b"From: <a@B\xc3\xbccher.test>" in message  # the message itself is not rewritten
    assert f"dmarc=pass reason=\"p=reject\" header.from={IDN}".encode() in auth_results(message)


def test_alignment_compares_a_labels():
    suffixes = psl.SuffixList(None)
    assert aligned("mail.bücher.test", IDN, "r", suffixes)
    assert aligned(IDN, "BÜCHER.test", "s", suffixes)
    assert not aligned("buecher.test", "bücher.test", "r", suffixes)
    fullwidth = "".join(chr(ord(c) - ord("A") + 0xFF21) for c in "EXAMPLE")
    assert ascii_domain(fullwidth + ".test") is None  # nameprep would make it example.test
    assert ascii_domain("bad..test") is None and ascii_domain("[127.0.0.1]") is None


@pytest.mark.parametrize(
    ("domain", "org"),
    [("example.org", "example.org"), ("a.b.example.co.test", "example.co.test"),
     ("co.test", "co.test"), ("x.y.wild.test", "x.y.wild.test"),
     ("a.www.wild.test", "www.wild.test"),
     ("unlisted.tld", "unlisted.tld"), ("a.b.unlisted.tld", "unlisted.tld")],
)  # fmt: skip
def test_organizational_domains(tmp_path, domain, org):
    (tmp_path / "list.dat").write_text("\n".join([*SUFFIXES, "org"]) + "\n")
    assert psl.load(str(tmp_path / "list.dat")).organizational_domain(domain) == org
    assert psl.load(str(tmp_path / "missing.dat")).organizational_domain("a.example.co.uk") == (
        "co.uk"  # without a list: the last two labels
    )
