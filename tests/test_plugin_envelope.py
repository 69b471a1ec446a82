"""Envelope checks end to end: resolvable_fromhost (real loopback DNS, null MX RFC 7505),
badmailfrom, badrcptto and dont_require_anglebrackets, through a real qpconn."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from tests.e2e_client import watch_errors
from tests.support.dnsserver import DNSTestServer, start_dns_server
from tests.support.policy import codes, lookups, script, sessions_plugin
from tests.support.server import in_thread, write_config

ZONE: dict[str, list[tuple[Any, ...]]] = {
    "mx.example": [("MX", (10, "mail.mx.example."))],
    "a.example": [("A", "192.0.2.1")],
    "aaaa.example": [("AAAA", "2001:db8::1")],
    "nullmx.example": [("MX", (0, "."))],
    "notnull.example": [("MX", (0, ".")), ("MX", (10, "mail.mx.example."))],
    "txtonly.example": [("TXT", "v=spf1 -all")],
    "sfaddr.example": [("TXT", "only a TXT record")],
}


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest_twisted.async_yield_fixture
async def dns() -> AsyncIterator[DNSTestServer]:
    srv = start_dns_server(ZONE, servfail={"sf.example"}, hang={"hang.example"})
    yield srv
    await srv.stop()


def start(qpconn_server: Any, dns: DNSTestServer, *lines: str, relay: str = "127.0.0.99") -> Any:
    recorder = sessions_plugin()
    server = qpconn_server(
        plugins=["relay", *lines, "rcpt_ok", "queue/maildir maildir", recorder],
        lookups=lookups(dns),
        files={
            "relayclients": [relay],
            "badmailfrom": [
                "Spammer@Example.net",
                "@junk.example Go away, junk",
                r"/^bulk-\d+@/",
            ],
            "badrcptto": ["trap@mx.test", "@closed.mx.test", "/^old-/ This person has left"],
            "rcpthosts": ["mx.test", "closed.mx.test"],
        },
    )
    server.extra["sessions"] = recorder
    return server


async def mail(server: Any, *senders: str, source: str = "127.0.0.2") -> list[Any]:
    commands = ["EHLO client.test"]
    for sender in senders:
        commands += [f"MAIL FROM:{sender}", "RSET"]
    replies = await in_thread(script, server.address, source, commands)
    await server.wait_sessions_closed()
    return replies[2::2]


FROMHOST = [
    ("<a@mx.example>", 250, "2.1.0"),
    ("<a@a.example>", 250, "2.1.0"),
    ("<a@aaaa.example>", 250, "2.1.0"),
    ("<a@notnull.example>", 250, "2.1.0"),  # a 0 . among others is not a null MX
    ("<a@nullmx.example>", 550, "5.7.27 Sender address has null MX"),
    ("<a@nowhere.example>", 550, "5.1.8 Sender domain nowhere.example does not exist"),
    ("<a@txtonly.example>", 550, "5.1.8 Sender domain txtonly.example has no MX and no address"),
    ("<a@sf.example>", 450, "4.4.3 Could not resolve sender domain sf.example; try again later"),
    ("<a@hang.example>", 450, "4.4.3 Could not resolve sender domain hang.example"),
    ("<>", 250, "2.1.0"),
    ("<a@[192.0.2.1]>", 250, "2.1.0"),
]


@pytest.mark.parametrize(("sender", "code", "text"), FROMHOST)
@pytest_twisted.ensureDeferred
async def test_resolvable_fromhost(qpconn_server, dns, sender, code, text):
    server = start(qpconn_server, dns, "resolvable_fromhost")
    (reply,) = await mail(server, sender)
    assert reply.code == code and reply.text.startswith(text), reply
    (verdict,) = server.extra["sessions"].of("resolvable_fromhost")
    expected = {250: ("pass", "skip"), 550: ("fail",), 450: ("temperror",)}[code]
    assert verdict["result"] in expected and verdict["stage"] == "mail"


@pytest_twisted.ensureDeferred
async def test_resolvable_fromhost_options(qpconn_server, dns):
    server = start(qpconn_server, dns, "resolvable_fromhost dns_error ignore")
    assert codes(await mail(server, "<a@sf.example>", "<a@nullmx.example>")) == [250, 550]
    server = start(qpconn_server, dns, "resolvable_fromhost reject 0")
    assert codes(await mail(server, "<a@nullmx.example>")) == [250]
    server = start(qpconn_server, dns, "resolvable_fromhost", relay="127.0.0.2")
    assert codes(await mail(server, "<a@nowhere.example>")) == [250]
    assert dns.count("nowhere.example") == 0
    # the mark is on the transaction: the next sender of the session is judged afresh
    server = start(qpconn_server, dns, "resolvable_fromhost reject naughty", "naughty")
    commands = ["EHLO c.test", "MAIL FROM:<a@nullmx.example>", "RCPT TO:<u@mx.test>", "RSET",
                "MAIL FROM:<a@mx.example>", "RCPT TO:<u@mx.test>"]  # fmt: skip
    replies = await in_thread(script, server.address, "127.0.0.2", commands)
    assert codes(replies) == [220, 250, 250, 550, 250, 250, 250]
    assert replies[3].text == "5.7.27 Sender address has null MX"


@pytest_twisted.ensureDeferred
async def test_badmailfrom(qpconn_server, dns):
    server = start(qpconn_server, dns, "badmailfrom")
    senders = ["<spammer@example.NET>", "<x@JUNK.example>", "<bulk-12@any.example>",
               "<bulk@any.example>", "<>", "<friend@example.net>"]  # fmt: skip
    replies = await mail(server, *senders)
    assert codes(replies) == [550, 550, 550, 250, 250, 250]
    assert replies[0].text == "5.7.1 Your envelope sender is in my badmailfrom list"
    assert replies[1].text == "5.7.1 Go away, junk"
    reasons = [v["reason"] for v in server.extra["sessions"].of("badmailfrom")]
    assert reasons[:3] == ["matches spammer@example.net", "matches @junk.example",
                           r"matches /^bulk-\d+@/"]  # fmt: skip
    server = start(qpconn_server, dns, "badmailfrom reject_type temp")
    assert (await mail(server, "<x@junk.example>"))[0].text == "4.7.1 Go away, junk"


@pytest_twisted.ensureDeferred
async def test_badrcptto_refuses_listed_recipients_even_for_relay_clients(qpconn_server, dns):
    for relay in ("127.0.0.99", "127.0.0.2"):
        server = start(qpconn_server, dns, "badrcptto", relay=relay)
        rcpts = ["trap@MX.test", "a@closed.mx.test", "old-joe@mx.test", "joe@mx.test"]
        commands = ["EHLO c.test", "MAIL FROM:<a@example.org>"]
        commands += [f"RCPT TO:<{r}>" for r in rcpts]
        replies = await in_thread(script, server.address, "127.0.0.2", commands)
        assert codes(replies) == [220, 250, 250, 550, 550, 550, 250]
        assert replies[3].text == "5.7.1 Mail to this recipient is not accepted here"
        assert replies[5].text == "5.7.1 This person has left"


def test_bad_list_lines_stop_the_start(tmp_path):
    config = Config(write_config(str(tmp_path), {"badmailfrom": ["justaword"]}))
    with pytest.raises(PluginLoadError, match="justaword"):
        load_plugin(config, "badmailfrom")
    config = Config(write_config(str(tmp_path), {"badrcptto": ["/([/"]}))
    with pytest.raises(PluginLoadError, match="bad pattern"):
        load_plugin(config, "badrcptto")


@pytest_twisted.ensureDeferred
async def test_dont_require_anglebrackets(qpconn_server, dns):
    commands = ["EHLO c.test", "MAIL FROM:a@example.org SIZE=10", "RCPT TO:user@mx.test",
                "RCPT TO:<other@mx.test>", "DATA", b"Subject: x\r\n\r\nbody"]  # fmt: skip
    server = start(qpconn_server, dns)
    replies = await in_thread(script, server.address, "127.0.0.2", commands)
    assert codes(replies)[:3] == [220, 250, 501]
    server = start(qpconn_server, dns, "dont_require_anglebrackets")
    replies = await in_thread(script, server.address, "127.0.0.2", commands)
    assert codes(replies) == [220, 250, 250, 250, 250, 354, 250]
    (message,) = server.messages()
    assert message.startswith(b"Return-Path: <a@example.org>\n")
    assert b"Delivered-To: user@mx.test\n" in message
    replies = await in_thread(script, server.address, "127.0.0.2", ["EHLO c", "MAIL FROM:"])
    assert replies[2].code == 501
