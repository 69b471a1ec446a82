"""queue/smtp-forward with DSN, SMTPUTF8 and BINARYMIME: what goes on depends on the next hop.

Two real next hops on loopback: a second qpconn (offers DSN, SMTPUTF8, CHUNKING,
BINARYMIME) and aiosmtpd (offers none of them).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest_twisted

from qpconn.plugins import Plugin
from tests.support import forwarding
from tests.support.nexthop import Recorder, aiosmtpd_next_hop
from tests.support.server import in_thread

TEXT = b"Subject: on\r\n\r\nbody"
DOMAINS = ["mx.test", "bücher.test"]


class Keep(Plugin):
    """On the next hop: what MAIL and each RCPT carried."""

    def register(self) -> None:
        self.seen: list[Any] = []

    def hook_queue_pre(self, transaction: Any) -> Any:
        self.seen.append(
            (
                dict(transaction.mail_params),
                [(r.address, dict(r.params)) for r in transaction.recipients],
                transaction.body_bytes(),
            )
        )


def next_hop_qpconn(tmp_path: Any) -> AbstractAsyncContextManager[Any]:
    return forwarding.next_hop_qpconn(tmp_path, Keep, DOMAINS)


def front(qpconn_server: Any, port: int) -> Any:
    return forwarding.front(qpconn_server, port, DOMAINS)


def deliver(address: Any, mail: str, rcpts: list[str], body: bytes = TEXT,
            bdat: bool = False) -> Any:  # fmt: skip
    return forwarding.deliver(address, mail, rcpts, body, bdat)


@pytest_twisted.ensureDeferred
async def test_dsn_passed_on_to_a_next_hop_that_offers_it(qpconn_server, tmp_path):
    async with next_hop_qpconn(tmp_path) as hop:
        server = front(qpconn_server, hop.address[1])
        reply = await in_thread(
            deliver,
            server.address,
            "<a@example.org> RET=HDRS ENVID=QQ+2B314",
            ["<u@mx.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;u+40mx.test", "<v@mx.test>"],
        )
        assert reply.code == 250, reply
        ((mail, rcpts, _),) = hop.factory.plugins[0].seen
        assert mail["RET"] == "HDRS" and mail["ENVID"] == "QQ+2B314"
        assert rcpts == [
            ("u@mx.test", {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;u+40mx.test"}),
            ("v@mx.test", {}),
        ]


@pytest_twisted.ensureDeferred
async def test_dsn_dropped_for_a_next_hop_without_it(qpconn_server):
    with aiosmtpd_next_hop() as (recorder, controller):
        server = front(qpconn_server, controller.port)
        reply = await in_thread(
            deliver, server.address, "<a@example.org> RET=FULL", ["<u@mx.test> NOTIFY=NEVER"]
        )
        assert reply.code == 250, reply
        assert recorder.commands[1:3] == ["MAIL a@example.org", "RCPT u@mx.test"]
        assert len(recorder.messages) == 1


@pytest_twisted.ensureDeferred
async def test_smtputf8_forwarded_to_a_next_hop_that_offers_it(qpconn_server, tmp_path):
    async with next_hop_qpconn(tmp_path) as hop:
        server = front(qpconn_server, hop.address[1])
        body = "Subject: Grüße\r\n\r\nü".encode()
        reply = await in_thread(
            deliver, server.address, "<jörg@example.org> SMTPUTF8", ["<用户@bücher.test>"], body
        )
        assert reply.code == 250, reply
        ((mail, rcpts, stored),) = hop.factory.plugins[0].seen
        assert "SMTPUTF8" in mail
        assert rcpts == [("用户@bücher.test", {})]
        assert stored == "ü\r\n".encode()


@pytest_twisted.ensureDeferred
async def test_smtputf8_to_a_next_hop_without_it_fails_permanently(qpconn_server):
    with aiosmtpd_next_hop(enable_SMTPUTF8=False) as (recorder, controller):
        server = front(qpconn_server, controller.port)
        address = await in_thread(
            deliver, server.address, "<jörg@example.org> SMTPUTF8", ["<u@mx.test>"]
        )
        header = await in_thread(
            deliver, server.address, "<a@example.org> SMTPUTF8", ["<u@mx.test>"],
            "Subject: Grüße\r\n\r\nx".encode(),
        )
        # Only a U-label domain: it goes on, as A-labels, without SMTPUTF8.
        domain = await in_thread(
            deliver, server.address, "<a@example.org> SMTPUTF8", ["<u@bücher.test>"]
        )
        assert (address.code, address.last[:5]) == (553, "5.6.7")
        assert "does not support SMTPUTF8" in address.last
        assert (header.code, header.last[:5]) == (554, "5.6.9")
        assert domain.code == 250, domain
        assert recorder.messages[-1].recipients == ["u@xn--bcher-kva.test"]
        assert len(recorder.messages) == 1


@pytest_twisted.ensureDeferred
async def test_binarymime_goes_on_with_bdat_or_fails(qpconn_server, tmp_path):
    body = b"Subject: bin\r\n\r\n" + bytes(range(256)) + b"\r\n.\r\n"
    async with next_hop_qpconn(tmp_path) as hop:
        server = front(qpconn_server, hop.address[1])
        reply = await in_thread(
            deliver, server.address, "<a@example.org> BODY=BINARYMIME", ["<u@mx.test>"],
            body, True,
        )
        assert reply.code == 250, reply
        ((mail, _, stored),) = hop.factory.plugins[0].seen
        assert mail["BODY"] == "BINARYMIME"
        assert stored == bytes(range(256)) + b"\r\n.\r\n"
    with aiosmtpd_next_hop() as (recorder, controller):
        server = front(qpconn_server, controller.port)
        reply = await in_thread(
            deliver, server.address, "<a@example.org> BODY=BINARYMIME", ["<u@mx.test>"],
            body, True,
        )
        assert (reply.code, reply.last[:5]) == (554, "5.6.3")
        assert recorder.messages == []


@pytest_twisted.ensureDeferred
async def test_bounce_for_refused_recipients_honours_notify(qpconn_server):
    refusal = "550 5.1.1 No such user"
    recorder = Recorder(rcpt_replies={"gone@mx.test": refusal, "never@mx.test": refusal,
                                      "quiet@mx.test": refusal})  # fmt: skip
    with aiosmtpd_next_hop(recorder) as (hop, controller):
        server = front(qpconn_server, controller.port)
        rcpts = ["<user@mx.test>", "<gone@mx.test> NOTIFY=FAILURE", "<never@mx.test> NOTIFY=NEVER",
                 "<quiet@mx.test> NOTIFY=SUCCESS,DELAY"]  # fmt: skip
        reply = await in_thread(deliver, server.address, "<a@example.org>", rcpts)
        assert reply.code == 250, reply
        message, bounce = hop.messages
        assert message.recipients == ["user@mx.test"]
        assert b"Final-Recipient: rfc822; gone@mx.test" in bounce.content
        assert b"never@mx.test" not in bounce.content
        assert b"quiet@mx.test" not in bounce.content
        # Nobody who failed wants to hear of it: no bounce at all.
        reply = await in_thread(
            deliver, server.address, "<a@example.org>",
            ["<user@mx.test>", "<never@mx.test> NOTIFY=NEVER"],
        )
        assert reply.code == 250, reply
        assert len(hop.messages) == 3
