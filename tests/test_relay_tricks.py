"""End-to-end: the classic open-relay test list against a server with no relay rights.

The server receives mail for ``local.test`` only and the client is no relay client. Each
address trick that once fooled a mail server into relaying is sent as a real RCPT:

* tricks that name a foreign destination (a source route, a foreign domain, a foreign
  address literal) are refused with ``550 5.7.1``;
* ``user@other.example@local.test`` is not an address at all: ``501``;
* tricks that are, read by the RFC 5321 grammar, a mailbox *at local.test* but carry a
  route in the local part (``user%other.example@local.test``,
  ``"user@other.example"@local.test`` ...) are refused with ``554 5.7.1``: a next hop
  that honours the percent or bang hack would relay them (``allow_untrusted_routing``);
* the other local tricks are accepted, and so are the routed ones where the site allows
  them; the test proves each is stored in the local Maildir under that very mailbox name
  (``Delivered-To``), never handed on for the percent or bang hack.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from tests.e2e_client import Client, ehlo, split_message, watch_errors
from tests.support.server import in_thread

LOCAL_FILES = {"me": "local.test", "rcpthosts": ["local.test"]}

# (RCPT argument, expected code, enhanced code)
REFUSED = [
    ("<@local.test:user@other.example>", 550, "5.7.1"),
    ("<@local.test,@local.test:user@other.example>", 550, "5.7.1"),
    ("<user@other.example>", 550, "5.7.1"),
    ("<user@other.example.>", 550, "5.7.1"),
    ("<USER@OTHER.EXAMPLE>", 550, "5.7.1"),
    ("<user@local.test.other.example>", 550, "5.7.1"),
    ("<user@other-local.test>", 550, "5.7.1"),
    ("<user@[192.0.2.1]>", 550, "5.7.1"),
    ("<user@[127.0.0.2]>", 550, "5.7.1"),
    ("<user@[IPv6:::1]>", 550, "5.7.1"),
    ("<user@[IPv6:::ffff:192.0.2.1]>", 550, "5.7.1"),
    ("<postmaster@other.example>", 550, "5.7.1"),
    ("<user@other.example@local.test>", 501, "5.1.3"),
    ("<user@local.test@other.example>", 501, "5.1.3"),
    ("<user@[127.1]>", 501, "5.1.3"),
    ("<user@[127.0.0.1].other.example>", 501, "5.1.3"),
    ("<user@local.test..>", 501, "5.1.3"),
    ("<other.example!user>", 501, "5.1.3"),
    ('<"user@other.example">', 501, "5.1.3"),
    ("<user@other.example", 501, "5.1.3"),
    ("user@other.example", 501, "5.1.3"),
    ("<user%other.example@local.test>", 554, "5.7.1"),
    ("<other.example!user@local.test>", 554, "5.7.1"),
    ('<"user@other.example"@local.test>', 554, "5.7.1"),
    ('<"user%other.example"@local.test>', 554, "5.7.1"),
    ("<user%other.example@[127.0.0.1]>", 554, "5.7.1"),
]

# (RCPT argument, the mailbox it is stored for)
LOCAL = [
    ("<@other.example:user@local.test>", "user@local.test"),
    ("<user@local.test.>", "user@local.test"),
    ("<USER@LOCAL.TEST>", "USER@LOCAL.TEST"),
    ("<user@[127.0.0.1]>", "user@[127.0.0.1]"),
    ("<postmaster>", "postmaster"),
]
# Refused above (554); stored like LOCAL where allow_untrusted_routing is 1.
ROUTED = [
    ("<user%other.example@local.test>", "user%other.example@local.test"),
    ("<other.example!user@local.test>", "other.example!user@local.test"),
    ('<"user@other.example"@local.test>', '"user@other.example"@local.test'),
    ('<"user%other.example"@local.test>', "user%other.example@local.test"),
    ("<user%other.example@[127.0.0.1]>", "user%other.example@[127.0.0.1]"),
]
STORED = [(rcpt, mailbox, {}) for rcpt, mailbox in LOCAL] + [
    (rcpt, mailbox, {"allow_untrusted_routing": "1"}) for rcpt, mailbox in ROUTED
]


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture
def local_server(qpconn_server: Any) -> Any:
    return qpconn_server(files=LOCAL_FILES)


@pytest_twisted.ensureDeferred
async def test_every_trick_that_names_a_foreign_destination_is_refused(qpconn_server):
    # More refusals than max_errors allows in one session: lift that limit here.
    local_server = qpconn_server(files={**LOCAL_FILES, "max_errors": "0"})

    def client() -> list[tuple[str, int, str]]:
        with ehlo(local_server) as smtp:
            assert smtp.code("MAIL FROM:<sender@example.org>") == 250
            results = []
            for rcpt, _, _ in REFUSED:
                reply = smtp.cmd(f"RCPT TO:{rcpt}")
                results.append((rcpt, reply.code, reply.last.split()[0]))
            # Nothing slipped in: DATA has no recipient to deliver to.
            results.append(("DATA", smtp.code("DATA"), ""))
            return results

    results = await in_thread(client)
    assert results[:-1] == REFUSED
    assert results[-1][1] == 554
    assert local_server.messages() == []


@pytest_twisted.ensureDeferred
async def test_relaying_denied_text_and_the_session_goes_on(local_server):
    def client() -> tuple[Any, int]:
        with ehlo(local_server) as smtp:
            smtp.cmd("MAIL FROM:<sender@example.org>")
            return smtp.cmd("RCPT TO:<user@other.example>"), smtp.code("RSET")

    refused, rset = await in_thread(client)
    assert (refused.code, refused.last) == (550, "5.7.1 Relaying denied")
    assert rset == 250


@pytest.mark.parametrize(
    ("rcpt", "mailbox", "setting"), STORED, ids=[rcpt for rcpt, _, _ in STORED]
)
@pytest_twisted.ensureDeferred
async def test_tricks_that_name_a_local_mailbox_are_stored_locally_as_that_mailbox(
    qpconn_server, rcpt, mailbox, setting
):
    local_server = qpconn_server(files={**LOCAL_FILES, **setting})

    def client() -> Any:
        with ehlo(local_server) as smtp:
            smtp.cmd("MAIL FROM:<sender@example.org>")
            accepted = smtp.cmd(f"RCPT TO:{rcpt}")
            assert accepted.code == 250, accepted
            assert smtp.code("DATA") == 354
            return smtp.message(b"Subject: relay test\r\n\r\nbody")

    reply = await in_thread(client)
    assert reply.code == 250
    (message,) = local_server.messages()
    fields, body = split_message(message)
    delivered = [f for f in fields if f.startswith(b"Delivered-To:")]
    # Stored in our own Maildir under the literal local mailbox: no percent or bang
    # hack, no source route was followed anywhere.
    assert delivered == [b"Delivered-To: " + mailbox.encode()]
    assert body == b"body\n"


@pytest_twisted.ensureDeferred
async def test_only_the_literal_of_the_address_the_client_reached_is_local(qpconn_server):
    # Listening on 127.0.0.1: [127.0.0.1] is us, and no other loopback literal is.
    server = qpconn_server(files=LOCAL_FILES)

    def client() -> list[int]:
        with Client(server.address) as smtp:
            smtp.cmd("EHLO client.test")
            smtp.cmd("MAIL FROM:<sender@example.org>")
            return [
                smtp.code(f"RCPT TO:<user@[{ip}]>")
                for ip in ("127.0.0.1", "127.0.0.2", "10.0.0.1", "IPv6:::1", "192.0.2.1")
            ]

    assert await in_thread(client) == [250, 550, 550, 550, 550]


@pytest_twisted.ensureDeferred
async def test_a_relay_client_may_send_to_foreign_domains(qpconn_server):
    # The control case: the same tricks are refused above only for want of relay rights.
    server = qpconn_server(files={**LOCAL_FILES, "relayclients": ["127.0.0.1"]})

    def client() -> list[int]:
        with ehlo(server) as smtp:
            smtp.cmd("MAIL FROM:<sender@example.org>")
            return [smtp.code("RCPT TO:<user@other.example>"), smtp.code("RCPT TO:<u@[192.0.2.1]>")]

    assert await in_thread(client) == [250, 250]
