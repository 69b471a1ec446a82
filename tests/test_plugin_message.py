"""Message checks end to end: headers, loop and bogus_bounce, through a real qpconn."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from tests.e2e_client import watch_errors
from tests.support.policy import codes, script, send_message, sessions_plugin
from tests.support.server import in_thread

DAY = 86400


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


def start(qpconn_server: Any, *lines: str, relay: str = "127.0.0.99") -> Any:
    recorder = sessions_plugin()
    server = qpconn_server(
        plugins=["relay", *lines, "rcpt_ok", "queue/maildir maildir", recorder],
        files={"relayclients": [relay]},
    )
    server.extra["sessions"] = recorder
    return server


def date(offset_days: float) -> str:
    return email.utils.formatdate(time.time() + offset_days * DAY)


def message(*fields: str) -> bytes:
    return ("\r\n".join(fields) + "\r\n\r\nbody\r\n").encode("ascii")


async def deliver(server: Any, text: bytes, source: str = "127.0.0.2", **kw: Any) -> Any:
    replies = await in_thread(
        send_message, server.address, source, kw.get("sender", "a@example.org"),
        kw.get("rcpt", "user@mx.test"), text,
    )  # fmt: skip
    await server.wait_sessions_closed()
    return replies[-1]


FROM = "From: a@example.org"
HEADERS = [
    (message(FROM, f"Date: {date(0)}"), 250, ""),
    (message(FROM, "Date: Sun, 1 Nov 2026 10:00:00 -0000"), 552, "too far in the past"),
    (message(FROM), 552, "5.6.0 Message has no Date header"),
    (message(f"Date: {date(0)}"), 552, "5.6.0 Message has no From header"),
    (message(FROM, f"Date: {date(3)}"), 552, "5.6.0 The Date header is too far in the future"),
    (message(FROM, f"Date: {date(1)}"), 250, ""),
    (message(FROM, f"Date: {date(-16)}"), 552, "5.6.0 The Date header is too far in the past"),
    (message(FROM, f"Date: {date(-14)}"), 250, ""),
    (message(FROM, "Date: yesterday"), 552, "5.6.0 The Date header is not a valid RFC 5322"),
    (message(FROM, f"Date: {date(0)}", "Subject: 1", "subject: 2"), 552,
     "5.6.0 Message has more than one Subject header"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "code", "reason"), HEADERS)
@pytest_twisted.ensureDeferred
async def test_headers_defaults(qpconn_server, text, code, reason):
    server = start(qpconn_server, "headers")
    reply = await deliver(server, text)
    assert reply.code == code and reason in reply.text, reply
    assert len(server.messages()) == (1 if code == 250 else 0)
    (verdict,) = server.extra["sessions"].of("headers")
    assert verdict["result"] == ("pass" if code == 250 else "fail")


@pytest_twisted.ensureDeferred
async def test_headers_arguments_and_relay_clients(qpconn_server):
    server = start(qpconn_server, "headers required From,Subject future 0 past 0")
    assert (await deliver(server, message("From: a@b.example", f"Date: {date(9)}"))).code == 552
    text = message("From: a@b.example", "Subject: hi", f"Date: {date(-99)}")
    assert (await deliver(server, text)).code == 250
    server = start(qpconn_server, "headers", relay="127.0.0.2")
    assert (await deliver(server, message("Subject: no from, no date"))).code == 250
    server = start(qpconn_server, "headers reject_type temp")
    reply = await deliver(server, message("Subject: s"))
    assert reply.code == 452 and reply.text.startswith("4.6.0 Message has no From header")
    with pytest.raises(PluginLoadError):
        load_plugin(Config(None), "headers", "future", "soon")


def hops(count: int) -> bytes:
    trace = [f"Received: from h{n}.test by h{n + 1}.test; {date(0)}" for n in range(count)]
    return message(*trace, "From: a@example.org", f"Date: {date(0)}")


@pytest.mark.parametrize(
    ("line", "count", "code"),
    [("loop", 98, 250), ("loop", 99, 250), ("loop", 100, 554), ("loop 5", 4, 250),
     ("loop 5", 5, 554), ("loop max_hops 5", 5, 554)],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_loop_counts_received_fields_with_ours(qpconn_server, line, count, code):
    # our own Received is on top at data_post: count + 1 hops are seen
    server = start(qpconn_server, line)
    reply = await deliver(server, hops(count))
    assert reply.code == code, reply
    if code == 554:
        assert reply.text == f"5.4.6 Too many hops ({count + 1}); this looks like a mail loop"
        assert server.messages() == []


def test_loop_arguments():
    for args in (("x",), ("0",), ("1", "2")):
        with pytest.raises(PluginLoadError):
            load_plugin(Config(None), "loop", *args)


BOUNCE = message("From: MAILER-DAEMON@example.org", f"Date: {date(0)}", "Subject: failure")


@pytest_twisted.ensureDeferred
async def test_bogus_bounce(qpconn_server):
    server = start(qpconn_server, "bogus_bounce")
    two = ["EHLO c.test", "MAIL FROM:<>", "RCPT TO:<a@mx.test>", "RCPT TO:<b@mx.test>", "DATA",
           BOUNCE]  # fmt: skip
    replies = await in_thread(script, server.address, "127.0.0.2", two)
    assert codes(replies) == [220, 250, 250, 250, 250, 354, 552]
    assert replies[-1].text == (
        "5.7.1 This is not a valid bounce: a bounce has exactly one recipient"
    )
    forged = b"Return-Path: <someone@example.org>\r\n" + BOUNCE
    reply = await deliver(server, forged, sender="")
    assert reply.code == 552 and "a bounce has an empty Return-Path" in reply.text
    assert (await deliver(server, BOUNCE, sender="")).code == 250
    assert (await deliver(server, b"Return-Path: <>\r\n" + BOUNCE, sender="")).code == 250
    two[-1] = BOUNCE.replace(b"MAILER-DAEMON", b"someone")
    two[1] = "MAIL FROM:<a@example.org>"
    assert codes(await in_thread(script, server.address, "127.0.0.2", two))[-1] == 250
    assert len(server.messages()) == 3
    server = start(qpconn_server, "bogus_bounce denysoft")
    assert (await deliver(server, forged, sender="")).code == 452
    server = start(qpconn_server, "bogus_bounce log")
    assert (await deliver(server, forged, sender="")).code == 250
    assert server.extra["sessions"].of("bogus_bounce")[0]["action"] == "log"
    server = start(qpconn_server, "bogus_bounce naughty", "naughty data_post")
    assert (await deliver(server, forged, sender="")).code == 552
