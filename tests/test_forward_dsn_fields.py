"""queue/smtp-forward's bounce carries what the client asked for with DSN (RFC 3461/3464).

A real next hop on loopback accepts one recipient and refuses another; the bounce goes
to the sender through that same next hop, so the test reads it where it lands there and
parses it as a mail client would (``multipart/report``, ``message/delivery-status``):
``Original-Envelope-Id`` holds MAIL's ENVID and ``Original-Recipient`` each refused
recipient's ORCPT, both decoded from xtext; a recipient without ORCPT has none.
``Arrival-Date`` is when the message reached us (the date of our Received field), not
when the bounce was written; ``Remote-MTA`` names the next hop without its port.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.utils
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any

import pytest
import pytest_twisted

from qpconn.hooks.results import DENY
from qpconn.plugins import Plugin
from tests.support import forwarding
from tests.support.nexthop import Recorder, aiosmtpd_next_hop
from tests.support.server import in_thread

TEXT = b"Subject: for you\r\nMessage-ID: <m1@example.org>\r\n\r\nbody"
REFUSAL = "550 5.1.1 No such user"
DOMAINS = ["mx.test"]


def deliver(address: Any, mail: str, rcpts: list[str], body: bytes = TEXT) -> Any:
    return forwarding.deliver(address, mail, rcpts, body)


def front(qpconn_server: Any, port: int) -> Any:
    return forwarding.front(qpconn_server, port, DOMAINS)


def status_blocks(bounce: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    """The per-message block and the per-recipient blocks of a DSN."""
    message = email.message_from_bytes(bounce)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    (status,) = [p for p in message.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2, blocks
    return blocks[0], blocks[1:]


@pytest_twisted.ensureDeferred
async def test_bounce_has_original_envelope_id_and_original_recipient(qpconn_server):
    recorder = Recorder(rcpt_replies={"gone@mx.test": REFUSAL, "lost@mx.test": REFUSAL})
    with aiosmtpd_next_hop(recorder) as (hop, controller):
        server = front(qpconn_server, controller.port)
        reply = await in_thread(
            deliver,
            server.address,
            "<a@mx.test> ENVID=QQ+2B314+3Dx RET=HDRS",
            [
                "<user@mx.test>",
                "<gone@mx.test> NOTIFY=FAILURE ORCPT=rfc822;Gone+2BAlias@Example.ORG",
                "<lost@mx.test>",
            ],
        )
        assert reply.code == 250, reply
        message, bounce = hop.messages
        assert message.recipients == ["user@mx.test"]
        assert bounce.recipients == ["a@mx.test"]
        per_message, per_rcpt = status_blocks(bounce.content)
        assert per_message["Original-Envelope-Id"] == "QQ+314=x"  # decoded, case kept
        assert per_message["Reporting-MTA"] == "dns; mx.test"
        gone, lost = per_rcpt
        assert gone["Original-Recipient"] == "rfc822;Gone+Alias@Example.ORG"
        assert gone["Final-Recipient"] == "rfc822; gone@mx.test"
        assert (gone["Action"], gone["Status"]) == ("failed", "5.1.1")
        assert lost["Final-Recipient"] == "rfc822; lost@mx.test"
        assert "Original-Recipient" not in lost  # no ORCPT given: no field
        # The original header comes back too, so the message can be told.
        assert b"Message-ID: <m1@example.org>" in bounce.content


@pytest_twisted.ensureDeferred
async def test_bounce_without_envid_or_orcpt_has_neither_field(qpconn_server):
    recorder = Recorder(rcpt_replies={"gone@mx.test": REFUSAL})
    with aiosmtpd_next_hop(recorder) as (hop, controller):
        server = front(qpconn_server, controller.port)
        reply = await in_thread(
            deliver, server.address, "<a@mx.test>", ["<user@mx.test>", "<gone@mx.test>"]
        )
        assert reply.code == 250, reply
        _, bounce = hop.messages
        per_message, (gone,) = status_blocks(bounce.content)
        assert "Original-Envelope-Id" not in per_message
        assert "Original-Recipient" not in gone
        assert gone["Final-Recipient"] == "rfc822; gone@mx.test"


class RefuseGone(Plugin):
    """On the next hop: no such user ``gone``."""

    def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> Any:
        if recipient.user == "gone":
            return DENY, "5.1.1 No such user"
        return None


def next_hop_qpconn(tmp_path: Any) -> AbstractAsyncContextManager[Any]:
    return forwarding.next_hop_qpconn(tmp_path, RefuseGone, DOMAINS)


@pytest_twisted.ensureDeferred
async def test_utf8_orcpt_comes_back_escaped_through_a_qpconn_next_hop(qpconn_server, tmp_path):
    # A next hop that offers DSN and SMTPUTF8 (a second qpconn): ENVID and ORCPT go on to
    # it, it refuses one recipient, and the bounce lands in its Maildir. The utf-8 ORCPT
    # (RFC 6533) is returned in the ASCII message/delivery-status as \x{HEX} escapes.
    async with next_hop_qpconn(tmp_path) as hop:
        server = front(qpconn_server, hop.address[1])
        reply = await in_thread(
            deliver,
            server.address,
            "<a@mx.test> SMTPUTF8 ENVID=env-1",
            ["<user@mx.test>", "<gone@mx.test> ORCPT=utf-8;jörg@bücher.test"],
        )
        assert reply.code == 250, reply
        message, bounce = hop.messages()
        assert b"\n\nbody" in message  # the next hop's Maildir: LF line endings
        assert b"MAILER-DAEMON@mx.test" in bounce
        per_message, (gone,) = status_blocks(bounce)
        assert per_message["Original-Envelope-Id"] == "env-1"
        assert gone["Original-Recipient"] == "utf-8;j\\x{F6}rg@b\\x{FC}cher.test"
        assert gone["Final-Recipient"] == "rfc822; gone@mx.test"


class SlowToRefuse(Recorder):
    """A next hop that thinks for a while before refusing ``gone@``: the bounce is then
    written whole seconds after the message arrived, so the two dates cannot agree by luck."""

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:  # fmt: skip
        if address == "gone@mx.test":
            await asyncio.sleep(1.1)
        return await super().handle_RCPT(server, session, envelope, address, options)


def received_date(content: bytes) -> Any:
    """The date of the topmost Received field (ours: the next hop adds none)."""
    top = email.message_from_bytes(content).get_all("Received")[0]
    return email.utils.parsedate_to_datetime(top.rsplit(";", 1)[1].strip())


@pytest.mark.parametrize("bdat", [False, True], ids=["DATA", "BDAT"])
@pytest_twisted.ensureDeferred
async def test_bounce_arrival_date_is_the_arrival_and_remote_mta_has_no_port(
    qpconn_server, bdat
):
    recorder = SlowToRefuse(rcpt_replies={"gone@mx.test": REFUSAL})
    with aiosmtpd_next_hop(recorder) as (hop, controller):
        server = front(qpconn_server, controller.port)
        reply = await in_thread(
            forwarding.deliver, server.address, "<a@mx.test>",
            ["<user@mx.test>", "<gone@mx.test>"], TEXT, bdat,
        )  # fmt: skip
        assert reply.code == 250, reply
        message, bounce = hop.messages
    per_message, (gone,) = status_blocks(bounce.content)
    arrived = email.utils.parsedate_to_datetime(per_message["Arrival-Date"])
    # The moment our Received field gives, in the message delivered and in the header the
    # bounce returns, to the second.
    (returned,) = [
        part.get_payload(decode=True)
        for part in email.message_from_bytes(bounce.content).walk()
        if part.get_content_type() == "text/rfc822-headers"
    ]
    assert arrived == received_date(message.content) == received_date(returned), (
        per_message["Arrival-Date"]
    )
    written = email.utils.parsedate_to_datetime(email.message_from_bytes(bounce.content)["Date"])
    assert written - arrived >= timedelta(seconds=1)  # the bounce's own time is later
    # RFC 3464 §2.3.5: the MTA's name, no port; an address bare, as Postfix writes it.
    assert gone["Remote-MTA"] == "dns; 127.0.0.1"
    # The text part still says where exactly the refusal came from.
    assert f"127.0.0.1:{controller.port} said: 550 5.1.1".encode() in bounce.content


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory with a short path: a Unix socket path must fit in 108 bytes."""
    path = tempfile.mkdtemp(prefix="qpd")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    ("where", "named"),
    [
        pytest.param("localhost", "localhost", id="host-name"),
        pytest.param("unix", "mx.test", id="unix-socket-is-this-host"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bounce_remote_mta_is_the_name_the_next_hop_was_contacted_as(
    qpconn_server, short_dir, where, named
):
    recorder = Recorder(rcpt_replies={"gone@mx.test": REFUSAL})
    socket_path = os.path.join(short_dir, "hop.sock") if where == "unix" else None
    with aiosmtpd_next_hop(recorder, unix_socket=socket_path) as (hop, controller):
        dest = f"unix:{socket_path}" if socket_path else f"{where} {controller.port}"
        server = qpconn_server(
            plugins=["relay", "rcpt_ok", f"queue/smtp-forward {dest} idle=0.1"],
            files={"rcpthosts": DOMAINS},
        )
        reply = await in_thread(
            deliver, server.address, "<a@mx.test>", ["<user@mx.test>", "<gone@mx.test>"]
        )
        assert reply.code == 250, reply
        _, bounce = hop.messages
    _, (gone,) = status_blocks(bounce.content)
    assert gone["Remote-MTA"] == f"dns; {named}"
