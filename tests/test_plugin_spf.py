"""sender_permitted_from end to end: a real qpconn, pyspf, and a real DNS server on loopback.

Every SPF result comes from TXT (and A/MX) records the test's DNS server serves; the
plugin's DNS goes to that server only (``LookupSettings(dns_servers=...)``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.server.peerinfo import LookupSettings
from tests.e2e_client import ehlo, watch_errors
from tests.support.dnsserver import DNSTestServer, start_dns_server
from tests.support.mail import Watch, header_fields
from tests.support.server import in_thread
from tests.test_e2e_lookups import BoundClient

INCLUDES = [f"l{n}.spf.test" for n in range(11)]
ZONE: dict[str, list[tuple[Any, ...]]] = {
    "pass.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    "fail.test": [("TXT", "v=spf1 ip4:192.0.2.1 -all exp=why.fail.test")],
    "why.fail.test": [("TXT", "%{i} is not one of %{d}'s mail servers")],
    "softfail.test": [("TXT", "v=spf1 ip4:192.0.2.1 ~all")],
    "neutral.test": [("TXT", "v=spf1 ?all")],
    "permerror.test": [("TXT", "v=spf1 ip4:127.0.0.1 frobnicate:x -all")],
    "toomany.test": [("TXT", "v=spf1 " + " ".join(f"include:{n}" for n in INCLUDES) + " -all")],
    **{name: [("TXT", "v=spf1 ip4:192.0.2.9 -all")] for name in INCLUDES},
    "mx.spf.test": [("TXT", "v=spf1 mx -all"), ("MX", (10, "mail.spf.test."))],
    "mail.spf.test": [("A", "127.0.0.1")],
    "none.test": [("A", "127.0.0.1")],
    "helo.test": [("TXT", "v=spf1 a -all"), ("A", "127.0.0.1")],
    "hang.test": [("TXT", "v=spf1 +all")],
}


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest_twisted.async_yield_fixture
async def dns() -> AsyncIterator[DNSTestServer]:
    srv = start_dns_server(ZONE, servfail={"servfail.test"}, hang={"hang.test"})
    yield srv
    await srv.stop()


def start(
    qpconn_server: Any, dns: DNSTestServer, args: str = "reject 3", extra: list[Any] = ()
) -> Any:
    return qpconn_server(
        plugins=[
            f"sender_permitted_from {args}",
            "relay",
            *extra,
            "rcpt_ok",
            "queue/maildir maildir",
        ],
        lookups=LookupSettings(rdns=False, dns_servers=[dns.address], dns_timeout=0.5),
        files={"relayclients": ["127.0.0.2"]},
    )


def mail_from(server: Any, sender: str, helo: str = "client.test") -> Any:
    client = ehlo(server)
    if helo != "client.test":
        assert client.code(f"EHLO {helo}") == 250
    reply = client.cmd(f"MAIL FROM:<{sender}>")
    client.close()
    return reply


def deliver(server: Any, sender: str) -> bytes:
    client = ehlo(server)
    reply = client.transaction(f"<{sender}>", ["<user@mx.test>"], b"Subject: spf\r\n\r\nhi\r\n")
    assert reply.code == 250, reply
    client.close()
    (message,) = server.messages()
    return message


@pytest.mark.parametrize(
    ("sender", "code", "text"),
    [
        ("a@pass.test", 250, "2.1.0"),
        ("a@fail.test", 550, "5.7.23 SPF fail for fail.test: 127.0.0.1 is not one of"),
        ("a@softfail.test", 250, "2.1.0"),
        ("a@neutral.test", 250, "2.1.0"),
        ("a@none.test", 250, "2.1.0"),
        ("a@permerror.test", 250, "2.1.0"),
        ("a@mx.spf.test", 250, "2.1.0"),
        ("a@servfail.test", 450, "4.7.24 SPF temporary error for servfail.test"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_level_3_refuses_fail_and_defers_temperror(qpconn_server, dns, sender, code, text):
    server = start(qpconn_server, dns)
    reply = await in_thread(mail_from, server, sender)
    assert (reply.code, reply.text[: len(text)]) == (code, text)


@pytest.mark.parametrize(
    ("level", "sender", "code"),
    [
        ("1", "a@fail.test", 250),
        ("1", "a@servfail.test", 250),
        ("2", "a@fail.test", 250),
        ("4", "a@permerror.test", 550),
        ("4", "a@toomany.test", 550),
        ("4", "a@softfail.test", 250),
        ("5", "a@softfail.test", 450),
        ("5", "a@neutral.test", 250),
        ("6", "a@softfail.test", 550),
    ],
)
@pytest_twisted.ensureDeferred
async def test_reject_levels(qpconn_server, dns, level, sender, code):
    server = start(qpconn_server, dns, f"reject {level}")
    reply = await in_thread(mail_from, server, sender)
    assert reply.code == code, reply


@pytest.mark.parametrize(
    ("sender", "result"),
    [
        ("a@pass.test", "pass"),
        ("a@fail.test", "fail"),
        ("a@softfail.test", "softfail"),
        ("a@neutral.test", "neutral"),
        ("a@none.test", "none"),
        ("a@permerror.test", "permerror"),
        ("a@toomany.test", "permerror"),
        ("a@servfail.test", "temperror"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_every_result_lands_in_authentication_results(qpconn_server, dns, sender, result):
    server = start(qpconn_server, dns, "reject 0")
    message = await in_thread(deliver, server, sender)
    fields = header_fields(message)
    assert fields[0].startswith(b"Authentication-Results: mx.test; spf=" + result.encode())
    assert f"smtp.mailfrom={sender}".encode() in fields[0]
    assert fields[1].startswith(b"Received: ")


@pytest_twisted.ensureDeferred
async def test_too_many_lookups_is_a_permerror_and_stops_asking(qpconn_server, dns):
    server = start(qpconn_server, dns, "reject 4")
    reply = await in_thread(mail_from, server, "a@toomany.test")
    assert reply.code == 550 and "5.7.24" in reply.text and "Too many DNS lookups" in reply.text
    assert dns.count("l10.spf.test") == 0


@pytest_twisted.ensureDeferred
async def test_a_hanging_resolver_gives_temperror_within_the_dns_timeout(qpconn_server, dns):
    server = start(qpconn_server, dns, "reject 2")
    reply = await in_thread(mail_from, server, "a@hang.test")
    assert reply.code == 450 and "4.7.24" in reply.text
    verdicts = [v for v in dns.queries if v[0] == "hang.test"]
    assert verdicts, dns.queries


@pytest_twisted.ensureDeferred
async def test_null_sender_is_checked_against_the_helo_name(qpconn_server, dns):
    server = start(qpconn_server, dns, "reject 0")

    def client() -> bytes:
        c = ehlo(server)
        assert c.code("EHLO helo.test") == 250
        assert c.transaction("<>", ["<user@mx.test>"], b"Subject: b\r\n\r\nx\r\n").code == 250
        c.close()
        return server.messages()[0]

    fields = header_fields(await in_thread(client))
    assert b"spf=pass" in fields[0] and b"smtp.helo=helo.test" in fields[0]


@pytest_twisted.ensureDeferred
async def test_forged_results_in_our_name_are_removed_others_kept(qpconn_server, dns):
    server = start(qpconn_server, dns, "reject 0")
    text = (
        b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=a@fail.test\r\n"
        b"Authentication-Results: other.example; spf=none\r\n"
        b"Subject: forged\r\n\r\nhi\r\n"
    )

    def client() -> bytes:
        c = ehlo(server)
        assert c.transaction("<a@fail.test>", ["<user@mx.test>"], text).code == 250
        c.close()
        return server.messages()[0]

    fields = header_fields(await in_thread(client))
    ours = [f for f in fields if f.startswith(b"Authentication-Results: mx.test")]
    assert len(ours) == 1 and b"spf=fail" in ours[0]
    assert b"Authentication-Results: other.example; spf=none" in fields


def send_from(server: Any, source: str, sender: str) -> int:
    with BoundClient(server.address, source) as client:
        assert client.code("EHLO client.test") == 250
        code = client.code(f"MAIL FROM:<{sender}>")
        client.cmd("RCPT TO:<user@mx.test>")
    return code


@pytest_twisted.ensureDeferred
async def test_verdicts_are_noted_and_relay_clients_not_checked(qpconn_server, dns):
    watch = Watch(Config(None), "watch")
    server = start(qpconn_server, dns, "reject 0", extra=[watch])
    assert await in_thread(send_from, server, "127.0.0.1", "a@fail.test") == 250
    assert watch.last("rcpt")["plugin"] == "sender_permitted_from"
    assert watch.last("rcpt")["result"] == "fail"
    asked = dns.count("fail.test")
    assert await in_thread(send_from, server, "127.0.0.2", "a@fail.test") == 250
    assert dns.count("fail.test") == asked
    assert watch.seen["rcpt"][-1] == [
        {
            "plugin": "sender_permitted_from",
            "result": "skip",
            "reason": "relay client or authenticated user",
            "stage": "mail",
        }
    ]
