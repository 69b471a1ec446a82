"""dnsbl and rhsbl end to end: a real qpconn asking block lists on a real loopback DNS server.

Clients connect from distinct 127.0.0.x addresses, so each has its own listing (or none)
in the test zones; the plugin's DNS goes to the test's server only.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted

from tests.e2e_client import watch_errors
from tests.support.dnsserver import DNSTestServer, start_dns_server
from tests.support.policy import codes, lookups, script, sessions_plugin
from tests.support.server import in_thread

ZONE: dict[str, list[tuple[Any, ...]]] = {
    "2.0.0.127.bl.test": [("A", "127.0.0.2"), ("TXT", "Listed: see https://bl.test/q")],
    "3.0.0.127.bl.test": [("A", "127.255.255.254")],  # "you may not query me": no listing
    "4.0.0.127.msg.test": [("A", "127.0.0.2")],
    "5.0.0.127.only.test": [("A", "127.0.0.2")],  # not one of the answers that count
    "6.0.0.127.only.test": [("A", "127.0.0.10")],
    "8.0.0.127.bl.test": [("A", "127.0.0.2")],  # listed, but in dnsbl_allow
    # rhsbl
    "spam.test.dbl.test": [("A", "127.0.1.2"), ("TXT", "spam domain")],
}
ZONES = ["bl.test", "msg.test:Blocked %IP% here", "only.test 127.0.0.10/32"]
SESSION = ["EHLO client.test", "MAIL FROM:<a@example.org>", "RCPT TO:<user@mx.test>"]


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest_twisted.async_yield_fixture
async def dns() -> AsyncIterator[DNSTestServer]:
    srv = start_dns_server(
        ZONE,
        servfail={"7.0.0.127.bl.test", "sf.test.dbl.test"},
        hang={"9.0.0.127.bl.test", "hang.test.dbl.test"},
    )
    yield srv
    await srv.stop()


def start(qpconn_server: Any, dns: DNSTestServer, line: str = "dnsbl", *, zones=ZONES,
          extra: list[Any] = (), relay: str = "127.0.0.99") -> Any:  # fmt: skip
    recorder = sessions_plugin()
    server = qpconn_server(
        plugins=["relay", line, *extra, "rcpt_ok", "queue/maildir maildir", recorder],
        lookups=lookups(dns),
        files={
            "dnsbl_zones": zones,
            "dnsbl_allow": ["127.0.0.8"],
            "rhsbl_zones": ["dbl.test"],
            "relayclients": [relay],
        },
    )
    server.extra["sessions"] = recorder
    return server


async def run(server: Any, source: str, commands: list[str] = SESSION) -> list[Any]:
    replies = await in_thread(script, server.address, source, commands)
    await server.wait_sessions_closed()
    return replies


@pytest_twisted.ensureDeferred
async def test_listed_client_is_refused_at_rcpt_with_the_lists_reason(qpconn_server, dns):
    server = start(qpconn_server, dns)
    replies = await run(server, "127.0.0.2", [*SESSION, "RCPT TO:<postmaster@mx.test>"])
    assert codes(replies) == [220, 250, 250, 550, 250]
    assert replies[3].text == (
        "5.7.1 Your address 127.0.0.2 is listed in bl.test: Listed: see https://bl.test/q"
    )
    (verdict,) = server.extra["sessions"].of("dnsbl")
    assert verdict["result"] == "fail" and verdict["action"] == "reject"
    assert verdict["zone"] == "bl.test" and verdict["stage"] == "rcpt"


@pytest.mark.parametrize(
    ("source", "text"),
    [
        ("127.0.0.4", "5.7.1 Your address 127.0.0.4 is listed in msg.test: Blocked 127.0.0.4 here"),
        ("127.0.0.6", "5.7.1 Your address 127.0.0.6 is listed in only.test: see only.test"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_own_messages_and_answer_filters(qpconn_server, dns, source, text):
    server = start(qpconn_server, dns)
    replies = await run(server, source)
    assert replies[3].code == 550 and replies[3].text == text


@pytest.mark.parametrize(
    ("source", "why"),
    [("127.0.0.1", "not listed"), ("127.0.0.3", "not listed"), ("127.0.0.5", "not listed")],
)
@pytest_twisted.ensureDeferred
async def test_unlisted_error_answers_and_filtered_answers_pass(qpconn_server, dns, source, why):
    server = start(qpconn_server, dns)
    assert codes(await run(server, source)) == [220, 250, 250, 250]
    (verdict,) = server.extra["sessions"].of("dnsbl")
    assert (verdict["result"], verdict["reason"]) == ("pass", why)


@pytest_twisted.ensureDeferred
async def test_connect_stage_refuses_before_the_greeting(qpconn_server, dns):
    server = start(qpconn_server, dns, "dnsbl stage connect")
    replies = await run(server, "127.0.0.2")
    assert codes(replies) == [550]
    assert replies[0].text.startswith("5.7.1 Your address 127.0.0.2 is listed in bl.test")
    assert codes(await run(server, "127.0.0.1")) == [220, 250, 250, 250]


@pytest_twisted.ensureDeferred
async def test_reject_type_temp_and_disconnect(qpconn_server, dns):
    server = start(qpconn_server, dns, "dnsbl reject_type temp")
    replies = await run(server, "127.0.0.2")
    assert replies[3].code == 450 and replies[3].text.startswith("4.7.1 Your address")
    server = start(qpconn_server, dns, "dnsbl reject_type disconnect stage connect")
    assert codes(await run(server, "127.0.0.2")) == [550]


@pytest_twisted.ensureDeferred
async def test_reject_0_only_records(qpconn_server, dns):
    server = start(qpconn_server, dns, "dnsbl reject 0")
    assert codes(await run(server, "127.0.0.2")) == [220, 250, 250, 250]
    (verdict,) = server.extra["sessions"].of("dnsbl")
    assert (verdict["result"], verdict["action"]) == ("fail", "log")


@pytest.mark.parametrize("stage", ["connect", "mail", "rcpt"])
@pytest_twisted.ensureDeferred
async def test_reject_naughty_defers_the_refusal_to_naughtys_stage(qpconn_server, dns, stage):
    server = start(qpconn_server, dns, "dnsbl reject naughty", extra=[f"naughty reject {stage}"])
    replies = await run(server, "127.0.0.2")
    expected = {"connect": [550], "mail": [220, 250, 550, 503], "rcpt": [220, 250, 250, 550]}
    assert codes(replies) == expected[stage]
    assert replies[-1 if stage != "mail" else 2].text.startswith("5.7.1 Your address 127.0.0.2")
    naughty = server.extra["sessions"].of("naughty")
    assert naughty[0]["reason"] == "marked by dnsbl at connect"
    assert codes(await run(server, "127.0.0.1")) == [220, 250, 250, 250]


@pytest.mark.parametrize(
    ("source", "relay", "why"),
    [("127.0.0.8", "127.0.0.99", "in dnsbl_allow"), ("127.0.0.2", "127.0.0.2", "relay client")],
)
@pytest_twisted.ensureDeferred
async def test_allowed_and_relay_clients_are_not_looked_up(qpconn_server, dns, source, relay, why):
    server = start(qpconn_server, dns, relay=relay)
    assert codes(await run(server, source)) == [220, 250, 250, 250]
    assert dns.count(f"{source.split('.')[-1]}.0.0.127.bl.test") == 0
    (verdict,) = server.extra["sessions"].of("dnsbl")
    assert (verdict["result"], verdict["reason"]) == ("skip", why)


@pytest.mark.parametrize("source", ["127.0.0.7", "127.0.0.9"])  # SERVFAIL, no answer
@pytest_twisted.ensureDeferred
async def test_a_failing_list_defers_or_is_ignored(qpconn_server, dns, source):
    server = start(qpconn_server, dns, zones=["bl.test"])
    replies = await run(server, source)
    assert replies[3].code == 450
    assert replies[3].text == "4.4.3 Block list lookup failed; try again later"
    server = start(qpconn_server, dns, "dnsbl dns_error ignore", zones=["bl.test"])
    assert codes(await run(server, source)) == [220, 250, 250, 250]
    (verdict,) = server.extra["sessions"].of("dnsbl")
    assert (verdict["result"], verdict["action"]) == ("temperror", "accept")


@pytest_twisted.ensureDeferred
async def test_all_zones_are_asked_at_once(qpconn_server, dns):
    """No zone answers: asked one after another, each would wait out the 0.5 s timeout
    before the next is asked; asked at once, the three questions arrive together."""
    names = [f"1.0.0.127.{zone}" for zone in ("bl.test", "msg.test", "only.test")]
    dns.hang.update(names)
    arrived: dict[str, float] = {}
    lookup = dns.authority._lookup

    def timed(name: bytes, *args: Any) -> Any:
        arrived.setdefault(name.decode().lower(), time.monotonic())
        return lookup(name, *args)

    dns.authority._lookup = timed
    server = start(qpconn_server, dns)
    replies = await run(server, "127.0.0.1")
    assert replies[3].text == "4.4.3 Block list lookup failed; try again later"
    assert sorted(arrived) == sorted(names)
    assert max(arrived.values()) - min(arrived.values()) < 0.5


# -- rhsbl ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sender", "code", "text"),
    [
        ("a@spam.test", 550, "5.7.1 Mail from spam.test is not accepted: listed in dbl.test"),
        ("a@SPAM.test", 550, "5.7.1 Mail from spam.test is not accepted: listed in dbl.test"),
        ("a@good.test", 250, "2.1.0"),
        ("<>", 250, "2.1.0"),
        ("a@[127.0.0.1]", 250, "2.1.0"),
        ("a@sf.test", 450, "4.4.3 Block list lookup failed; try again later"),
        ("a@hang.test", 450, "4.4.3 Block list lookup failed; try again later"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_rhsbl_refuses_listed_sender_domains(qpconn_server, dns, sender, code, text):
    server = start(qpconn_server, dns, "rhsbl")
    path = sender if sender == "<>" else f"<{sender}>"
    replies = await run(server, "127.0.0.1", ["EHLO client.test", f"MAIL FROM:{path}"])
    assert replies[2].code == code and replies[2].text.startswith(text), replies[2]
    if code == 550:
        assert replies[2].text.endswith(": spam domain")


@pytest_twisted.ensureDeferred
async def test_rhsbl_skips_relay_clients_and_naughty_marks_the_transaction(qpconn_server, dns):
    server = start(qpconn_server, dns, "rhsbl", relay="127.0.0.1")
    replies = await run(server, "127.0.0.1", ["EHLO client.test", "MAIL FROM:<a@spam.test>"])
    assert replies[2].code == 250 and dns.count("spam.test.dbl.test") == 0
    server = start(qpconn_server, dns, "rhsbl reject naughty", extra=["naughty"])
    commands = ["EHLO c.test", "MAIL FROM:<a@spam.test>", "RCPT TO:<u@mx.test>", "RSET",
                "MAIL FROM:<a@good.test>", "RCPT TO:<u@mx.test>"]  # fmt: skip
    assert codes(await run(server, "127.0.0.2", commands)) == [220, 250, 250, 550, 250, 250, 250]
