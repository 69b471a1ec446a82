"""helo and fcrdns end to end: a real qpconn, clients on 127.0.0.x, a real loopback DNS server."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted

from tests.e2e_client import watch_errors
from tests.support.dnsserver import DNSTestServer, start_dns_server
from tests.support.policy import codes, lookups, script, sessions_plugin
from tests.support.server import in_thread


def rev(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


ZONE: dict[str, list[tuple[Any, ...]]] = {
    "good.test": [("A", "127.0.0.2")],
    "v6.test": [("AAAA", "::1")],
    "mxonly.test": [("MX", (10, "mail.elsewhere.test."))],
    # fcrdns
    rev("127.0.0.21"): [("PTR", "confirmed.test.")],
    "confirmed.test": [("A", "127.0.0.21")],
    rev("127.0.0.22"): [("PTR", "liar.test.")],
    "liar.test": [("A", "127.9.9.9")],
    # 127.0.0.23: no PTR at all
    rev("127.0.0.25"): [("PTR", "sf-forward.test.")],
}


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest_twisted.async_yield_fixture
async def dns() -> AsyncIterator[DNSTestServer]:
    srv = start_dns_server(
        ZONE, servfail={"sf.test", rev("127.0.0.24"), "sf-forward.test"}, hang={"hang.test"}
    )
    yield srv
    await srv.stop()


def start(qpconn_server: Any, dns: DNSTestServer, line: str, *, rdns: bool = False,
          relay: str = "127.0.0.99") -> Any:  # fmt: skip
    recorder = sessions_plugin()
    server = qpconn_server(
        plugins=["relay", line, "rcpt_ok", "queue/maildir maildir", recorder],
        lookups=lookups(dns, rdns=rdns),
        files={"badhelo": ["bad.test", r"/^spam\d+\./"], "relayclients": [relay]},
    )
    server.extra["sessions"] = recorder
    return server


async def ehlo(server: Any, source: str, *names: str) -> list[Any]:
    replies = await in_thread(script, server.address, source, [f"EHLO {n}" for n in names])
    await server.wait_sessions_closed()
    return replies[1:]


LENIENT = [
    ("bad.test", "127.0.0.2", 550, "5.7.1 HELO name bad.test is not accepted here"),
    ("Spam42.example", "127.0.0.2", 550, "5.7.1 HELO name Spam42.example is not accepted here"),
    ("127.0.0.2", "127.0.0.2", 550, "5.7.1 An address in HELO must be in brackets: [127.0.0.2]"),
    ("[127.0.0.5]", "127.0.0.2", 550, "5.7.1 You are not [127.0.0.5]: your address is"),
    ("[127.0.0.2]", "127.0.0.2", 250, ""),
    ("[IPv6:::1]", "127.0.0.2", 550, "5.7.1 You are not [IPv6:::1]"),
    ("[::1]", "127.0.0.2", 550, "5.7.1 HELO [::1] is not a valid address literal"),
    ("mx.test", "127.0.0.2", 550, "5.7.1 You are not mx.test"),
    ("LOCALHOST", "127.0.0.2", 550, "5.7.1 You are not LOCALHOST"),
    ("mx.test", "127.0.0.1", 250, ""),  # from our own address: it may be us
    ("nowhere.test", "127.0.0.2", 250, ""),  # lenient does not ask DNS
]


@pytest.mark.parametrize(("name", "source", "code", "text"), LENIENT)
@pytest_twisted.ensureDeferred
async def test_lenient(qpconn_server, dns, name, source, code, text):
    server = start(qpconn_server, dns, "helo")
    (reply, again) = await ehlo(server, source, name, "good.test")
    assert reply.code == code and reply.text.startswith(text), reply
    assert again.code == 250  # a refused HELO may be said again
    assert dns.queries == []
    verdict = server.extra["sessions"].of("helo")[0]
    assert verdict["helo"] == name and verdict["result"] == ("pass" if code == 250 else "fail")


RFC = [
    ("good.test", 250, ""),
    ("v6.test", 250, ""),
    ("mxonly.test", 250, ""),
    ("nowhere.test", 550, "5.7.1 HELO name nowhere.test does not resolve"),
    ("bad_name!", 550, "5.7.1 HELO name bad_name! is not a valid host name"),
    ("sf.test", 450, "4.4.3 Could not resolve HELO name sf.test; try again later"),
    ("hang.test", 450, "4.4.3 Could not resolve HELO name hang.test; try again later"),
    ("[127.0.0.2]", 250, ""),
]


@pytest.mark.parametrize(("name", "code", "text"), RFC)
@pytest_twisted.ensureDeferred
async def test_rfc_wants_a_name_that_resolves(qpconn_server, dns, name, code, text):
    server = start(qpconn_server, dns, "helo policy rfc")
    (reply,) = await ehlo(server, "127.0.0.2", name)
    assert reply.code == code and reply.text.startswith(text), reply


STRICT = [
    ("good.test", "127.0.0.2", 250, ""),
    ("good.test", "127.0.0.3", 550, "5.7.1 HELO name good.test does not resolve to your address"),
    ("mxonly.test", "127.0.0.2", 550, "5.7.1 HELO name mxonly.test does not resolve to your"),
    ("single", "127.0.0.2", 550, "5.7.1 HELO name single is not fully qualified"),
]


@pytest.mark.parametrize(("name", "source", "code", "text"), STRICT)
@pytest_twisted.ensureDeferred
async def test_strict_wants_the_clients_own_address(qpconn_server, dns, name, source, code, text):
    server = start(qpconn_server, dns, "helo policy strict")
    (reply,) = await ehlo(server, source, name)
    assert reply.code == code and reply.text.startswith(text), reply


@pytest_twisted.ensureDeferred
async def test_helo_too_relay_clients_skipped_and_reject_0(qpconn_server, dns):
    server = start(qpconn_server, dns, "helo", relay="127.0.0.2")
    (reply,) = await ehlo(server, "127.0.0.2", "bad.test")
    assert reply.code == 250
    assert server.extra["sessions"].of("helo")[0]["result"] == "skip"
    server = start(qpconn_server, dns, "helo reject 0")
    (reply,) = await ehlo(server, "127.0.0.2", "bad.test")
    assert reply.code == 250
    assert server.extra["sessions"].of("helo")[0]["action"] == "log"
    replies = await in_thread(script, server.address, "127.0.0.2", ["HELO 127.0.0.2"])
    assert replies[1].code == 250
    server = start(qpconn_server, dns, "helo reject_type disconnect")
    replies = await in_thread(script, server.address, "127.0.0.2", ["HELO bad.test", "NOOP"])
    assert codes(replies) == [220, 550]


# -- fcrdns ---------------------------------------------------------------------------------
FCRDNS = [
    ("127.0.0.21", 250, ""),
    ("127.0.0.22", 550, "5.7.25 Your reverse DNS name liar.test does not resolve to 127.0.0.22"),
    ("127.0.0.23", 550, "5.7.25 Your address 127.0.0.23 has no reverse DNS name"),
    ("127.0.0.24", 450, "4.7.25 Reverse DNS lookup of 127.0.0.24 failed; try again later"),
    ("127.0.0.25", 450, "4.7.25 Reverse DNS lookup of 127.0.0.25 failed; try again later"),
]


@pytest.mark.parametrize(("source", "code", "text"), FCRDNS)
@pytest_twisted.ensureDeferred
async def test_fcrdns_judges_the_servers_lookup(qpconn_server, dns, source, code, text):
    server = start(qpconn_server, dns, "fcrdns", rdns=True)
    replies = await in_thread(script, server.address, source, ["EHLO c.test"])
    assert replies[0].code == (220 if code == 250 else code), replies
    assert replies[0].text.startswith(text) or code == 250
    await server.wait_sessions_closed()
    (verdict,) = server.extra["sessions"].of("fcrdns")
    assert verdict["result"] == {250: "pass", 550: "fail", 450: "temperror"}[code]


@pytest_twisted.ensureDeferred
async def test_fcrdns_options_and_skips(qpconn_server, dns):
    server = start(qpconn_server, dns, "fcrdns dns_error ignore", rdns=True)
    assert codes(await in_thread(script, server.address, "127.0.0.24", [])) == [220]
    server = start(qpconn_server, dns, "fcrdns reject 0", rdns=True)
    assert codes(await in_thread(script, server.address, "127.0.0.23", [])) == [220]
    server = start(qpconn_server, dns, "fcrdns", rdns=True, relay="127.0.0.23")
    assert codes(await in_thread(script, server.address, "127.0.0.23", [])) == [220]
    server = start(qpconn_server, dns, "fcrdns", rdns=False)
    assert codes(await in_thread(script, server.address, "127.0.0.23", [])) == [220]
    await server.wait_sessions_closed()
    assert server.extra["sessions"].of("fcrdns")[0]["reason"] == "reverse DNS lookups are off"
