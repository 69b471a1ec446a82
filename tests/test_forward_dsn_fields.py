"""queue/smtp-forward's bounce carries what the client asked for with DSN (RFC 3461/3464).

A real next hop on loopback accepts one recipient and refuses another; the bounce goes
to the sender through that same next hop, so the test reads it where it lands there and
parses it as a mail client would (``multipart/report``, ``message/delivery-status``):
``Original-Envelope-Id`` holds MAIL's ENVID and ``Original-Recipient`` each refused
recipient's ORCPT, both decoded from xtext; a recipient without ORCPT has none.
"""

from __future__ import annotations

import email
import email.message
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest_twisted

from qpconn.plugins import Plugin
from qpconn.results import DENY
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
        assert b"\r\n\r\nbody" in message
        assert b"MAILER-DAEMON@mx.test" in bounce
        per_message, (gone,) = status_blocks(bounce)
        assert per_message["Original-Envelope-Id"] == "env-1"
        assert gone["Original-Recipient"] == "utf-8;j\\x{F6}rg@b\\x{FC}cher.test"
        assert gone["Final-Recipient"] == "rfc822; gone@mx.test"
