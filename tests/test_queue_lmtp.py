"""queue/lmtp end to end: a real qpconn delivering to aiosmtpd's LMTP server on loopback.

aiosmtpd's LMTP class is the mailbox store (over TCP and over a Unix socket); the
handler answers the end of DATA with one reply per recipient, as RFC 2033 says, and each
test chooses those replies to exercise the partial-failure rule.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import LogLevel, globalLogPublisher

from qpconn.config import Config
from qpconn.plugins import Plugin, PluginLoadError, load_plugin
from tests.e2e_client import Client
from tests.support.nexthop import Recorder, aiosmtpd_next_hop
from tests.support.process import free_port
from tests.support.server import in_thread

TEXT = b"Subject: to the store\r\n\r\nhello mailbox"
RCPTS = ["<one@mx.test>", "<two@mx.test>"]


class KeepNotes(Plugin):
    """Listed after the queue plugin: keeps ``notes["forward"]`` for the test to read."""

    def register(self) -> None:
        self.forward: list[Any] = []

    def hook_queue_post(self, transaction: Any) -> None:
        self.forward.append(transaction.notes.get("forward"))


@pytest.fixture
def errors() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.error:
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory with a short path: a Unix socket path must fit in 108 bytes."""
    path = tempfile.mkdtemp(prefix="qpl")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def lmtp_server(qpconn_server: Any, where: str, *extra: Any) -> Any:
    return qpconn_server(plugins=["relay", "rcpt_ok", f"queue/lmtp {where}", *extra])


def send(address: tuple[str, int], rcpts: list[str] = RCPTS) -> tuple[int, str]:
    with Client(address, timeout=15) as client:
        assert client.cmd("EHLO client.test").code == 250
        reply = client.transaction("<a@example.org>", rcpts, TEXT)
        client.cmd("QUIT")
    return reply.code, reply.text


@pytest_twisted.ensureDeferred
async def test_every_recipient_delivered_is_250(qpconn_server):
    keep = KeepNotes(Config(None), "keep")
    with aiosmtpd_next_hop(Recorder(lmtp_replies={}), lmtp=True) as (store, controller):
        server = lmtp_server(qpconn_server, f"127.0.0.1 {controller.port}", keep)
        code, text = await in_thread(send, server.address)
        assert code == 250, text
        assert text.startswith("2.0.0 Queued as ")
        assert "<one@mx.test> delivered" in text and "<two@mx.test> delivered" in text
        assert [m.recipients for m in store.messages] == [["one@mx.test"], ["two@mx.test"]]
        assert store.messages[0].content.endswith(b"\r\n\r\nhello mailbox\r\n")
        assert "EHLO" in store.commands  # the recorder counts the LHLO too (same hook)
    ((notes),) = keep.forward
    assert notes["data"] == [
        "250 2.0.0 <one@mx.test> delivered",
        "250 2.0.0 <two@mx.test> delivered",
    ]


@pytest_twisted.ensureDeferred
async def test_unix_socket(qpconn_server, short_dir):
    path = os.path.join(short_dir, "lmtp.sock")
    recorder = Recorder(lmtp_replies={})
    with aiosmtpd_next_hop(recorder, lmtp=True, unix_socket=path) as (store, _):
        server = lmtp_server(qpconn_server, f"unix:{path}")
        for _ in range(3):
            code, text = await in_thread(send, server.address)
            assert code == 250, text
        assert len(store.messages) == 6
        assert len(store.hellos) == 1  # one connection, kept in the pool


@pytest_twisted.ensureDeferred
async def test_temporary_failure_of_one_mailbox_makes_the_client_retry(qpconn_server, errors):
    recorder = Recorder(lmtp_replies={"two@mx.test": "452 4.2.2 <two@mx.test> Over quota"})
    with aiosmtpd_next_hop(recorder, lmtp=True) as (store, controller):
        server = lmtp_server(qpconn_server, f"127.0.0.1 {controller.port}")
        code, text = await in_thread(send, server.address)
        # Nothing is lost: the client keeps the message and retries...
        assert code == 451, text
        assert "<two@mx.test>" in text and "Over quota" in text
        assert "delivered to 1 of 2 recipients" in text
        assert [m.recipients for m in store.messages] == [["one@mx.test"]]
        # ...and the retry succeeds, at the price of a duplicate for one@, logged as such.
        recorder.lmtp_replies = {}
        assert (await in_thread(send, server.address))[0] == 250
        delivered = [r for m in store.messages for r in m.recipients]
        assert sorted(delivered) == ["one@mx.test", "one@mx.test", "two@mx.test"]
    (event,) = errors
    assert "duplicate" in event["log_format"] and event["rcpts"] == "<one@mx.test>"


@pytest_twisted.ensureDeferred
async def test_permanent_failure_of_one_mailbox_is_reported(qpconn_server, errors):
    recorder = Recorder(lmtp_replies={"two@mx.test": "550 5.1.1 <two@mx.test> No such user"})
    with aiosmtpd_next_hop(recorder, lmtp=True) as (store, controller):
        server = lmtp_server(qpconn_server, f"127.0.0.1 {controller.port}")
        code, text = await in_thread(send, server.address)
        # The client bounces with the store's reason; nobody gets a duplicate.
        assert code == 550, text
        assert text == "5.1.1 <two@mx.test> No such user (delivered to 1 of 2 recipients)"
        assert [m.recipients for m in store.messages] == [["one@mx.test"]]
    assert errors == []


@pytest_twisted.ensureDeferred
async def test_all_mailboxes_failing_temporarily_is_their_reply(qpconn_server):
    replies = {r.strip("<>"): "451 4.3.0 Store busy" for r in RCPTS}
    with aiosmtpd_next_hop(Recorder(lmtp_replies=replies), lmtp=True) as (store, controller):
        server = lmtp_server(qpconn_server, f"127.0.0.1 {controller.port}")
        assert await in_thread(send, server.address) == (451, "4.3.0 Store busy")
        assert store.messages == []


@pytest_twisted.ensureDeferred
async def test_recipient_refused_at_rcpt_stops_before_data(qpconn_server):
    recorder = Recorder(
        rcpt_replies={"two@mx.test": "550 5.1.1 Unknown"}, lmtp_replies={}
    )
    with aiosmtpd_next_hop(recorder, lmtp=True) as (store, controller):
        server = lmtp_server(qpconn_server, f"127.0.0.1 {controller.port}")
        code, text = await in_thread(send, server.address)
        assert (code, text) == (550, "5.1.1 Unknown (not delivered to any recipient)")
        assert store.messages == [] and "DATA" not in store.commands


@pytest_twisted.ensureDeferred
async def test_store_down_is_451(qpconn_server, short_dir):
    server = lmtp_server(qpconn_server, f"127.0.0.1 {free_port()}")
    code, text = await in_thread(send, server.address)
    assert code == 451 and "cannot connect" in text, text
    server2 = lmtp_server(qpconn_server, f"unix:{os.path.join(short_dir, 'none.sock')}")
    code, text = await in_thread(send, server2.address)
    assert code == 451 and "cannot connect" in text, text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["127.0.0.1"], "no default port", id="no-port"),
        pytest.param(["unix:/x", "24"], "expects HOST", id="unix-and-port"),
        pytest.param([], "no default port|expects HOST", id="nothing"),
    ],
)
def test_bad_arguments(args, message):
    with pytest.raises(PluginLoadError, match=message):
        load_plugin(Config(None), "queue/lmtp", *args)
