"""queue/smtp-forward through a real Postfix (Debian's package) on loopback.

A private Postfix instance (its own config directory, queue and log under a temporary
directory, listening on a free 127.0.0.1 port) relays to an aiosmtpd final hop. Our
client's 250 must carry Postfix's own queue id, and the message must come out of
Postfix intact. Postfix's master must start as root (it drops to the ``postfix`` user);
without the package, root or that user, the test skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from tests.e2e_client import Client
from tests.support.nexthop import Recorder, aiosmtpd_next_hop
from tests.support.postfix import private_postfix
from tests.support.postfix import read as _read
from tests.support.server import in_thread
from tests.support.timing import wait_until

MASTER_CF = """\
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
"""

MAIN_CF = """\
relayhost = [127.0.0.1]:{hop}
smtpd_recipient_restrictions = check_recipient_access texthash:{root}/etc/access
"""


@pytest.fixture
def postfix_relay() -> Iterator[tuple[int, Recorder, str]]:
    """(Postfix's port, the final hop's recorder, Postfix's log path)."""
    access = {"access": "gone@mx.test REJECT 5.1.1 No such user here\n"}
    with (
        aiosmtpd_next_hop() as (hop, controller),
        private_postfix(MAIN_CF, MASTER_CF, access, hop=controller.port) as instance,
    ):
        yield instance.port, hop, instance.maillog


def send(address: tuple[str, int], rcpts: list[str]) -> tuple[int, str]:
    with Client(address, timeout=30) as client:
        assert client.cmd("EHLO client.test").code == 250
        text = b"Subject: through postfix\r\nMessage-ID: <pf1@client.test>\r\n\r\nhello\r\n..x"
        reply = client.transaction("<a@example.org>", rcpts, text)
        client.cmd("QUIT")
    return reply.code, reply.text


@pytest_twisted.ensureDeferred
async def test_forward_through_postfix(qpconn_server, postfix_relay: Any):
    port, hop, maillog = postfix_relay
    server = qpconn_server(
        plugins=["relay", "rcpt_ok", f"queue/smtp-forward 127.0.0.1 {port} timeout=20"]
    )
    code, text = await in_thread(send, server.address, ["<user@mx.test>"])
    assert code == 250, text
    # Postfix's own words: "2.0.0 Ok: queued as 4ABCDEF..." quoted in our reply.
    assert "said: 2.0.0 Ok: queued as " in text, text
    postfix_id = text.rsplit("queued as ", 1)[1].rstrip(")")
    assert await in_thread(wait_until, lambda: len(hop.messages) == 1, 20), _read(maillog)
    (message,) = hop.messages
    assert message.recipients == ["user@mx.test"]
    assert f"with ESMTP id {postfix_id}".encode() in message.content  # Postfix's Received
    assert b"by mx.test (qpconn" in message.content  # and ours
    assert message.content.endswith(b"\r\n\r\nhello\r\n.x\r\n")


@pytest_twisted.ensureDeferred
async def test_postfix_refusing_one_recipient(qpconn_server, postfix_relay: Any):
    port, hop, maillog = postfix_relay
    server = qpconn_server(
        plugins=["relay", "rcpt_ok", f"queue/smtp-forward 127.0.0.1 {port} timeout=20"]
    )
    code, text = await in_thread(send, server.address, ["<user@mx.test>", "<gone@mx.test>"])
    assert code == 250, text
    # Postfix relays the message to user@ and our bounce (from <>) to the sender.
    assert await in_thread(wait_until, lambda: len(hop.messages) == 2, 20), _read(maillog)
    by_sender = {m.sender: m for m in hop.messages}
    assert by_sender["a@example.org"].recipients == ["user@mx.test"]
    bounce = by_sender["<>"]
    assert bounce.recipients == ["a@example.org"]
    assert b"Final-Recipient: rfc822; gone@mx.test" in bounce.content
    assert b"No such user here" in bounce.content
