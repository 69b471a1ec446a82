"""End-to-end: sender-specified routing in a local part is refused to untrusted clients.

``victim%example.org@mx.test``, ``example.org!victim@mx.test`` and
``"victim@example.org"@mx.test`` are, by RFC 5321, mailboxes at a local domain, and qpconn
stores them as such; but a next hop behind ``queue/smtp-forward`` that honours the percent
hack or bang paths would relay them. So ``rcpt_ok`` refuses them (``554 5.7.1 <addr>:
Relay access denied``, as Postfix) unless the client relays, authenticated, or the site
set ``allow_untrusted_routing 1``. Each case runs against the real server over loopback.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from qpconn.plugins.auth.flat_file import hash_password
from tests.e2e_client import ehlo, split_message, watch_errors
from tests.support.server import in_thread

# Every form at each kind of local destination: a configured domain (mx.test), the
# default local domain (localhost) and the literal of the address the client reached.
ROUTED = [
    "<victim%example.org@mx.test>",
    '<"victim@example.org"@mx.test>',
    "<example.org!victim@mx.test>",
    "<victim%example.org@localhost>",
    "<victim%example.org@[127.0.0.1]>",
    '<"victim@example.org"@[127.0.0.1]>',
    "<example.org!victim@[127.0.0.1]>",
]

# Local recipients without routing: the rule must not touch them.
ORDINARY = [
    "<user@mx.test>",
    "<first.last+tag@mx.test>",
    "<User-Name@LOCALHOST>",
    '<"john doe"@mx.test>',
    "<user@[127.0.0.1]>",
    "<postmaster>",
]

PASSWORD = "correct horse battery"
MESSAGE = b"Subject: routing\r\n\r\nbody\r\n"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


def delivered_to(messages: list[bytes]) -> list[bytes]:
    """The Delivered-To value of each stored message (the mailbox it was stored for)."""
    found = []
    for message in messages:
        fields, _ = split_message(message)
        found += [f.split(b": ", 1)[1] for f in fields if f.startswith(b"Delivered-To:")]
    return sorted(found)


def stored_as(rcpts: list[str]) -> list[bytes]:
    """What delivered_to() gives when each of ``rcpts`` was stored under its literal name."""
    return sorted(rcpt[1:-1].encode() for rcpt in rcpts)


def rcpt_replies(server: Any, rcpts: list[str]) -> list[tuple[int, str]]:
    """Each RCPT's (code, last line) in one transaction from a plain client; then RSET."""
    with ehlo(server) as smtp:
        assert smtp.code("MAIL FROM:<sender@example.org>") == 250
        replies = [smtp.cmd(f"RCPT TO:{rcpt}") for rcpt in rcpts]
        assert smtp.code("RSET") == 250
    return [(reply.code, reply.last) for reply in replies]


def send_each(server: Any, rcpts: list[str], login: tuple[str, str] | None = None) -> None:
    """One message to all of ``rcpts`` through smtplib; raises if any recipient is refused."""
    with smtplib.SMTP(*server.address, timeout=10) as smtp:
        smtp.ehlo("client.test")
        if login is not None:
            smtp.login(*login)
        refused = smtp.sendmail("sender@example.org", [rcpt[1:-1] for rcpt in rcpts], MESSAGE)
        assert refused == {}


@pytest_twisted.ensureDeferred
async def test_each_routing_form_is_refused_554_to_a_plain_client_and_logged(server):
    rejections: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("event") == "rejection" and event.get("hook") == "rcpt":
            rejections.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        replies = await in_thread(rcpt_replies, server, ROUTED)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert replies == [(554, f"5.7.1 {rcpt}: Relay access denied") for rcpt in ROUTED]
    assert server.messages() == []
    logged = [(e["plugin"], e["code"], e["rcpt"], e["result"]) for e in rejections]
    assert logged == [("rcpt_ok", 554, rcpt, "rejected") for rcpt in ROUTED]


@pytest_twisted.ensureDeferred
async def test_smtplib_sees_the_routing_refusal_as_a_refused_recipient(server):
    def client() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            try:
                smtp.sendmail("sender@example.org", ["victim%example.org@mx.test"], MESSAGE)
            except smtplib.SMTPRecipientsRefused as exc:
                return exc.recipients
        raise AssertionError("the routed recipient was accepted")

    refused = await in_thread(client)
    assert refused == {
        "victim%example.org@mx.test": (
            554,
            b"5.7.1 <victim%example.org@mx.test>: Relay access denied",
        )
    }
    assert server.messages() == []


@pytest_twisted.ensureDeferred
async def test_ordinary_local_addresses_are_unaffected(server):
    replies = await in_thread(rcpt_replies, server, ORDINARY)
    assert [code for code, _ in replies] == [250] * len(ORDINARY), replies


@pytest_twisted.ensureDeferred
async def test_routing_to_a_foreign_domain_is_still_plain_relaying_denied(server):
    # Not local, so the ordinary relay refusal answers, not the routing one.
    replies = await in_thread(rcpt_replies, server, ["<victim%mx.test@example.org>"])
    assert replies == [(550, "5.7.1 Relaying denied")]


@pytest_twisted.ensureDeferred
async def test_a_relay_client_may_use_routing_and_it_is_stored_literally(qpconn_server):
    server = qpconn_server(files={"relayclients": ["127.0.0.1"]})
    await in_thread(send_each, server, ROUTED)
    # Stored under the literal local mailbox: qpconn itself follows no route.
    assert delivered_to(server.messages()) == stored_as(ROUTED)


@pytest_twisted.ensureDeferred
async def test_an_authenticated_client_may_use_routing(qpconn_server, tmp_path):
    passwords = tmp_path / "passwords"
    passwords.write_text(f"bob:{hash_password(PASSWORD, log2n=12)}\n")
    server = qpconn_server(
        files={
            "tls_before_auth": "0",
            "plugins": [
                "relay",
                f"auth/flat_file {passwords}",
                "rcpt_ok",
                f"queue/maildir {tmp_path / 'maildir'}",
            ],
        }
    )
    # The same client is refused before it authenticates: AUTH is what lets it through.
    before = await in_thread(rcpt_replies, server, ROUTED[:1])
    assert before == [(554, f"5.7.1 {ROUTED[0]}: Relay access denied")]
    await in_thread(send_each, server, ROUTED, ("bob", PASSWORD))
    assert delivered_to(server.messages()) == stored_as(ROUTED)


@pytest.mark.parametrize("value", ["1", "yes", "On"])
@pytest_twisted.ensureDeferred
async def test_allow_untrusted_routing_lets_a_plain_client_use_routing(qpconn_server, value):
    server = qpconn_server(files={"allow_untrusted_routing": value})
    await in_thread(send_each, server, ROUTED)
    assert delivered_to(server.messages()) == stored_as(ROUTED)


@pytest.mark.parametrize("value", ["0", "no", "off"])
@pytest_twisted.ensureDeferred
async def test_allow_untrusted_routing_off_values_keep_the_refusal(qpconn_server, value):
    server = qpconn_server(files={"allow_untrusted_routing": value})
    replies = await in_thread(rcpt_replies, server, ROUTED[:2])
    assert [code for code, _ in replies] == [554, 554]


@pytest.mark.parametrize("value", ["maybe", "2", "allow"])
def test_a_bad_allow_untrusted_routing_value_stops_the_plugin_loading(tmp_path, value):
    (tmp_path / "allow_untrusted_routing").write_text(f"{value}\n")
    with pytest.raises(PluginLoadError, match=f"allow_untrusted_routing: '{value}' is not 1 or 0"):
        load_plugin(Config(tmp_path), "rcpt_ok")
