"""XCLIENT (Postfix's extension) from a raw client: who may use it, what it changes.

A real qpconn on loopback, with ``xclient_hosts`` naming 127.0.0.5 (the "proxy"); the
client binds 127.0.0.5 or another loopback address and talks line by line. A recording
plugin keeps what the Connection held at each connect hook and at the end of each message,
so the tests see that the session really is the claimed client's: its address and name
for the hooks, a new connect, a fresh relay verdict, the Received header.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.core.events import Command, ProtocolError
from qpconn.core.reply import Reply
from qpconn.core.session import ServerSession, State
from qpconn.hooks.results import DECLINED, DENY
from qpconn.plugins import Plugin
from qpconn.smtp.xclient import TEMPUNAVAIL, XClientError, parse_xclient
from tests.e2e_client import split_message
from tests.support.dnsserver import DNSTestServer, start_dns_server
from tests.support.policy import BoundClient, lookups
from tests.support.server import in_thread
from tests.support.timing import wait_until

PROXY = "127.0.0.5"
FULL = (
    "XCLIENT NAME=mail.example.org ADDR=192.0.2.7 PORT=4242 PROTO=ESMTP HELO=helo.example.org"
    " LOGIN=alice DESTADDR=198.51.100.1 DESTPORT=25"
)
MESSAGE = b"From: a@example.org\r\nSubject: xclient\r\n\r\nhello\r\n"
FIELDS = [
    *("remote_ip", "remote_port", "remote_host", "remote_host_verified", "remote_info"),
    *("local_ip", "local_port", "relay_client", "hello", "hello_host", "auth_user"),
]


def facts(connection: Any) -> dict[str, Any]:
    found = {name: getattr(connection, name) for name in FIELDS}
    found["notes"] = dict(connection.notes)
    found["id"] = connection.id
    return found


class Recorder(Plugin):
    """Keeps the Connection's facts at every connect and data_post; refuses 192.0.2.66."""

    def register(self) -> None:
        self.connects: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = []

    def hook_connect(self, transaction: Any) -> Any:
        self.connects.append(facts(transaction.connection))
        if transaction.connection.remote_ip == "192.0.2.66":
            return DENY, "5.7.1 not you"
        return DECLINED

    def hook_data_post(self, transaction: Any) -> Any:
        self.messages.append(facts(transaction.connection))
        return DECLINED


def start(qpconn_server: Any, dns: DNSTestServer | None = None) -> tuple[Any, Recorder]:
    recorder = Recorder(Config(None), "recorder")
    server = qpconn_server(
        plugins=["relay", recorder, "rcpt_ok", "queue/maildir"],
        files={"xclient_hosts": [PROXY, "10.9.0.0/16"], "relayclients": [PROXY]},
        lookups=lookups(dns, rdns=True) if dns is not None else None,
    )
    return server, recorder


def talk(address: tuple[str, int], source: str, lines: list[str | bytes]) -> list[Reply]:
    """The greeting, then one reply per line (bytes: message text after a 354)."""
    with BoundClient(address, source) as client:
        replies = [client.greeting]
        for line in lines:
            if isinstance(line, bytes):
                replies.append(client.message(line))
            else:
                replies.append(client.cmd(line))
            if replies[-1].code in (221, 421):
                break
        return replies


def run(server: Any, lines: list[str | bytes], source: str = PROXY) -> Any:
    return in_thread(talk, server.address, source, lines)


# -- who may use it ------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_only_xclient_hosts_see_it_and_may_use_it(qpconn_server):
    server, recorder = start(qpconn_server)
    proxy = await run(server, ["EHLO proxy.test"])
    assert "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT" in proxy[1].lines
    other = await run(server, ["EHLO other.test", "XCLIENT ADDR=192.0.2.7", "HELO again.test"],
                      source="127.0.0.6")  # fmt: skip
    assert not any(line.startswith("XCLIENT") for line in other[1].lines)
    assert (other[2].code, other[2].text) == (550, "5.7.0 Error: insufficient authorization")
    # nothing changed: the session is still 127.0.0.6's, and no connect hook ran again
    assert other[3].code == 250 and "[127.0.0.6]" in other[3].text
    assert [c["remote_ip"] for c in recorder.connects] == [PROXY, "127.0.0.6"]


# -- what it changes -------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_every_attribute_becomes_the_clients_fact_and_the_session_starts_over(
    qpconn_server,
):
    server, recorder = start(qpconn_server)
    replies = await run(server, [
        "EHLO proxy.test", "MAIL FROM:<a@example.org>", "RCPT TO:<x@elsewhere.example>", "RSET",
        FULL,
        "MAIL FROM:<a@example.org>",  # no EHLO yet: the session started over
        "EHLO helo.example.org", "MAIL FROM:<a@example.org>", "RCPT TO:<x@elsewhere.example>",
        "RCPT TO:<user@mx.test>", "DATA", MESSAGE,
    ])  # fmt: skip
    codes = [reply.code for reply in replies]
    # the proxy (a relay client) may relay; after XCLIENT, LOGIN lets the client relay
    assert codes == [220, 250, 250, 250, 250, 220, 503, 250, 250, 250, 250, 354, 250]
    assert replies[5].text == replies[0].text  # the new reply is the greeting
    assert "Hi mail.example.org [192.0.2.7]" in replies[7].lines[0]
    proxy_connect, client_connect = recorder.connects
    assert proxy_connect["remote_ip"] == PROXY and proxy_connect["relay_client"] is True
    assert client_connect["id"] == proxy_connect["id"]  # one TCP connection, one log id
    expected = {
        "remote_ip": "192.0.2.7",
        "remote_port": 4242,
        "remote_host": "mail.example.org",
        "remote_host_verified": True,
        "remote_info": None,
        "local_ip": "198.51.100.1",
        "local_port": 25,
        "relay_client": False,  # 127.0.0.5 is in relayclients; 192.0.2.7 is not
        "hello": "ehlo",
        "hello_host": "helo.example.org",
        "auth_user": "alice",
    }
    assert {key: client_connect[key] for key in expected} == expected
    note = client_connect["notes"]["xclient"]
    assert note["peer"][0] == PROXY
    assert note["attributes"]["ADDR"] == "192.0.2.7" and note["attributes"]["LOGIN"] == "alice"
    assert "verdicts" not in client_connect["notes"]  # notes start over with the session
    (message,) = server.messages()
    fields, _ = split_message(message)
    received = next(f for f in fields if f.startswith(b"Received:"))
    assert received.startswith(
        b"Received: from helo.example.org (mail.example.org [192.0.2.7])"
    )
    assert b"with ESMTPA" in received


@pytest_twisted.ensureDeferred
async def test_a_client_without_login_is_judged_on_its_own_address(qpconn_server):
    server, recorder = start(qpconn_server)
    replies = await run(server, [
        "XCLIENT ADDR=192.0.2.8 NAME=[UNAVAILABLE]", "EHLO c.example",
        "MAIL FROM:<a@example.org>", "RCPT TO:<x@elsewhere.example>", "RCPT TO:<user@mx.test>",
    ])  # fmt: skip
    assert [reply.code for reply in replies] == [220, 220, 250, 250, 550, 250]
    assert "Hi unknown [192.0.2.8]" in replies[2].lines[0]
    client = recorder.connects[-1]
    assert client["remote_host"] is None and client["notes"]["rdns_error"] == "nxdomain"
    assert client["auth_user"] is None and client["relay_client"] is False


@pytest_twisted.ensureDeferred
async def test_unavailable_values(qpconn_server):
    server, recorder = start(qpconn_server)
    replies = await run(server, [
        "XCLIENT ADDR=[UNAVAILABLE] PORT=[UNAVAILABLE] NAME=[TEMPUNAVAIL] HELO=[UNAVAILABLE]"
        " LOGIN=[UNAVAILABLE] PROTO=[UNAVAILABLE]",
        "EHLO c.example",
    ])  # fmt: skip
    assert [reply.code for reply in replies] == [220, 220, 250]
    client = recorder.connects[-1]
    assert client["remote_ip"] is None and client["remote_port"] is None
    assert client["remote_host"] is None and client["notes"]["rdns_error"] == "error"
    assert client["hello_host"] is None and client["auth_user"] is None
    assert client["notes"]["xclient"]["attributes"]["NAME"] == TEMPUNAVAIL


@pytest_twisted.ensureDeferred
async def test_attributes_split_over_commands_add_up_and_authorization_stays(qpconn_server):
    server, recorder = start(qpconn_server)
    replies = await run(server, [
        "XCLIENT ADDR=IPV6:2001:db8::7 NAME=six.example.org",
        "EHLO six.example.org",  # still offered: judged on the proxy, not on 2001:db8::7
        "XCLIENT LOGIN=j+C3+A9r+C3+B4me HELO=six.example.org",
        "EHLO six.example.org",
        "MAIL FROM:<a@example.org>", "RCPT TO:<user@mx.test>", "DATA", MESSAGE,
    ])  # fmt: skip
    assert [reply.code for reply in replies] == [220, 220, 250, 220, 250, 250, 250, 354, 250]
    assert any(line.startswith("XCLIENT") for line in replies[2].lines)
    first, second = recorder.connects[1:]
    assert first["remote_ip"] == "2001:db8::7" and first["auth_user"] is None
    assert second["remote_ip"] == "2001:db8::7" and second["remote_host"] == "six.example.org"
    assert second["auth_user"] == "jérôme" and second["hello_host"] == "six.example.org"
    assert second["notes"]["xclient"]["peer"][0] == PROXY
    received = [f for f in split_message(server.messages()[0])[0] if f.startswith(b"Received")]
    assert b"(six.example.org [IPv6:2001:db8::7])" in received[0]


@pytest_twisted.ensureDeferred
async def test_a_refusal_at_connect_for_the_new_client_ends_the_session(qpconn_server):
    server, recorder = start(qpconn_server)

    def refused() -> tuple[Reply, bool]:
        with BoundClient(server.address, PROXY) as client:
            reply = client.cmd("XCLIENT ADDR=192.0.2.66")
            return reply, client.is_closed()

    reply, closed = await in_thread(refused)
    assert (reply.code, reply.text) == (550, "5.7.1 not you") and closed
    assert recorder.connects[-1]["remote_ip"] == "192.0.2.66"


# -- what it refuses -------------------------------------------------------------------------
BAD = [
    ("XCLIENT", 501, "5.5.4 Syntax: XCLIENT attribute=value ..."),
    ("XCLIENT FOO=bar", 501, "5.5.4 Bad XCLIENT attribute name: FOO"),
    ("XCLIENT ADDR", 501, "5.5.4 Bad ADDR syntax: attribute=value expected"),
    ("XCLIENT ADDR=999.1.1.1", 501, "5.5.4 Bad ADDR syntax: address expected"),
    ("XCLIENT ADDR=192.0.2.1+ZZ", 501, "5.5.4 Bad ADDR syntax: bad '+' escape in xtext"),
    ("XCLIENT PORT=70000", 501, "5.5.4 Bad PORT syntax: port number expected"),
    ("XCLIENT NAME=bad!name", 501, "5.5.4 Bad NAME syntax: host name expected"),
    ("XCLIENT PROTO=LMTP", 501, "5.5.4 Bad PROTO syntax: SMTP or ESMTP expected"),
    ("XCLIENT DESTPORT=x", 501, "5.5.4 Bad DESTPORT syntax: port number expected"),
    ("XCLIENT LOGIN=+FF", 501, "5.5.4 Bad LOGIN syntax: UTF-8 expected"),
]


@pytest_twisted.ensureDeferred
async def test_bad_syntax_is_refused_and_changes_nothing(qpconn_server):
    server, recorder = start(qpconn_server)
    lines = [line for line, _, _ in BAD]
    replies = await run(server, ["EHLO proxy.test", *lines, "MAIL FROM:<a@example.org>"])
    for (line, code, text), reply in zip(BAD, replies[2:], strict=False):
        assert reply.code == code, line
        assert reply.text.startswith(text), (line, reply.text)
    assert replies[-1].code == 250  # still the proxy's EHLO'd session
    assert [c["remote_ip"] for c in recorder.connects] == [PROXY]


@pytest_twisted.ensureDeferred
async def test_inside_a_transaction_it_is_refused_and_after_rset_accepted(qpconn_server):
    server, recorder = start(qpconn_server)
    replies = await run(server, [
        "EHLO proxy.test", "MAIL FROM:<a@example.org>", "XCLIENT ADDR=192.0.2.7",
        "RCPT TO:<user@mx.test>", "RSET", "XCLIENT ADDR=192.0.2.7",
    ])  # fmt: skip
    assert [reply.code for reply in replies] == [220, 250, 250, 503, 250, 250, 220]
    assert replies[3].text == "5.5.1 Error: XCLIENT not allowed now"
    assert [c["remote_ip"] for c in recorder.connects] == [PROXY, "192.0.2.7"]


# -- lookups for a claimed address -------------------------------------------------------------
@pytest_twisted.async_yield_fixture
async def dns() -> AsyncIterator[DNSTestServer]:
    zone = {
        "7.2.0.192.in-addr.arpa": [("PTR", "Real.Example.")],
        "real.example": [("A", "192.0.2.7")],
        "9.2.0.192.in-addr.arpa": [("PTR", "liar.example.")],
        "liar.example": [("A", "192.0.2.1")],
    }
    srv = start_dns_server(zone)
    yield srv
    await srv.stop()


@pytest_twisted.ensureDeferred
async def test_an_address_without_name_is_looked_up_as_a_direct_client_would_be(
    qpconn_server, dns
):
    server, recorder = start(qpconn_server, dns)
    replies = await run(server, ["XCLIENT ADDR=192.0.2.7", "XCLIENT ADDR=192.0.2.9",
                                 "XCLIENT ADDR=192.0.2.7 NAME=given.example"])  # fmt: skip
    assert [reply.code for reply in replies] == [220, 220, 220, 220]
    proxy, verified, liar, named = recorder.connects
    assert proxy["remote_host"] is None  # 127.0.0.5 has no PTR in the test zone
    assert (verified["remote_host"], verified["remote_host_verified"]) == ("real.example", True)
    assert (liar["remote_host"], liar["remote_host_verified"]) == ("liar.example", False)
    assert liar["notes"]["rdns_error"] == "mismatch"
    # NAME is believed: no lookup could say otherwise
    assert (named["remote_host"], named["remote_host_verified"]) == ("given.example", True)
    assert "rdns_error" not in named["notes"]


# -- the parser alone ------------------------------------------------------------------------
def test_parse_xclient_values():
    assert parse_xclient("name=Mail.Example.ORG. addr=IPv6:::ffff:192.0.2.1 port=0") == {
        "NAME": "mail.example.org",
        "ADDR": "192.0.2.1",
        "PORT": 0,
    }
    assert parse_xclient("PORT=1 PORT=2 login=a+2Bb") == {"PORT": 2, "LOGIN": "a+b"}
    with pytest.raises(XClientError, match="Bad HELO syntax"):
        parse_xclient("HELO=a+20b")  # a space, once decoded


# -- the session core ------------------------------------------------------------------------
def _command(session: ServerSession, line: bytes) -> Any:
    session.receive_data(line)
    return session.next_event()


def test_the_core_hands_xclient_on_outside_a_transaction_and_starts_over_on_220():
    session = ServerSession()
    session.greet(Reply(220, "hi"))
    assert _command(session, b"XCLIENT\r\n").reply.code == 501  # an argument is required
    assert _command(session, b"EHLO proxy\r\n") == Command("EHLO", "proxy")
    session.send(Reply(250, "ok"))
    assert _command(session, b"XCLIENT ADDR=192.0.2.1\r\n") == Command("XCLIENT", "ADDR=192.0.2.1")
    session.send(Reply(550, "5.7.0 no"))  # refused: nothing changes
    assert (session.state, session.esmtp) == (State.READY, True)
    assert _command(session, b"MAIL FROM:<a@b.example>\r\n").verb == "MAIL"
    session.send(Reply(250, "ok"))
    refusal = _command(session, b"XCLIENT ADDR=192.0.2.1\r\n")
    assert isinstance(refusal, ProtocolError) and refusal.reply.code == 503
    assert _command(session, b"RSET\r\n").verb == "RSET"
    session.send(Reply(250, "ok"))
    assert _command(session, b"AUTH PLAIN AGFAYg==\r\n").verb == "AUTH"
    session.send(Reply(235, "ok"))
    assert _command(session, b"xclient NAME=a.example\r\n").verb == "XCLIENT"
    session.send(Reply(220, "hi again"))
    # greeted again: no EHLO (so no MAIL, no extensions) and no AUTH
    assert (session.state, session.esmtp, session.authenticated) == (State.INIT, False, False)
    assert _command(session, b"MAIL FROM:<a@b.example>\r\n").reply.code == 503
    assert _command(session, b"XCLIENT HELO=x\r\n").verb == "XCLIENT"  # legal before EHLO too


# -- the per-address connection limits ---------------------------------------------------------
def hold_sessions(address: tuple[str, int], clients: list[str]) -> list[Reply]:
    """One session per client address, all held open at once: each XCLIENT's reply."""
    with contextlib.ExitStack() as stack:
        replies = []
        for client_ip in clients:
            session = stack.enter_context(BoundClient(address, PROXY))
            session.cmd("EHLO proxy.test")
            replies.append(session.cmd(f"XCLIENT ADDR={client_ip}"))
        return replies


@pytest_twisted.ensureDeferred
async def test_the_client_behind_the_proxy_counts_against_the_per_address_limit(qpconn_server):
    """The proxy's own address is exempt (xclient_hosts are, by default), and each session
    counts under the address XCLIENT gives, as if that client had connected directly."""
    recorder = Recorder(Config(None), "recorder")
    server = qpconn_server(
        plugins=[recorder, "rcpt_ok", "queue/maildir"],
        files={"xclient_hosts": [PROXY], "max_connections_per_ip": "2"},
    )
    clients = ["192.0.2.7", "192.0.2.7", "192.0.2.7", "192.0.2.8", "192.0.2.8"]
    replies = await in_thread(hold_sessions, server.address, clients)
    assert [reply.code for reply in replies] == [220, 220, 421, 220, 220]
    assert replies[2].text == (
        "4.7.0 mx.test Too many connections from your address, try again later"
    )
    # the refused one ran no connect hook for 192.0.2.7; the others did
    assert [c["remote_ip"] for c in recorder.connects].count("192.0.2.7") == 2
    # once the server has seen the sessions end, the address has its places back
    counter = server.factory.connection_counter
    assert await in_thread(wait_until, lambda: counter.per_ip["192.0.2.7"] == 0)
    again = await in_thread(hold_sessions, server.address, ["192.0.2.7", "192.0.2.7"])
    assert [reply.code for reply in again] == [220, 220]


def test_xclient_hosts_are_exempt_from_the_per_address_limits_by_default(tmp_path):
    from qpconn.smtp.limits import limit_exceptions

    (tmp_path / "xclient_hosts").write_text("10.9.0.0/16\n")
    assert "10.9.1.1" in limit_exceptions(Config(str(tmp_path)))
    assert "10.8.1.1" not in limit_exceptions(Config(str(tmp_path)))
    (tmp_path / "connection_limit_exceptions").write_text("")  # a file replaces the default
    assert "10.9.1.1" not in limit_exceptions(Config(str(tmp_path)))
