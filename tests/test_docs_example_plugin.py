"""docs/examples/greylist_lite.py, loaded from a ``plugins`` line as docs/plugins.md says."""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from tests.support.server import in_thread

PLUGIN = "docs.examples.greylist_lite"
MESSAGE = b"Subject: greylist test\r\n\r\nbody\r\n"


def start(qpconn_server, tmp_path, *args: str, files=None):
    """A server whose config/plugins file lists the example plugin before rcpt_ok."""
    maildir = tmp_path / "maildir"
    plugins = ["relay", " ".join((PLUGIN, *args)), "rcpt_ok", f"queue/maildir {maildir}"]
    return qpconn_server(files={"plugins": plugins, **(files or {})})


def greylister(server):
    (plugin,) = [p for p in server.factory.plugins if p.name == PLUGIN]
    return plugin


def send(server, sender="sender@example.org", rcpts=("user@mx.test",)):
    """One message over a fresh connection: smtplib's refused dict, or the exception."""
    with smtplib.SMTP(*server.address, timeout=10) as smtp:
        smtp.ehlo("client.example.org")
        try:
            return smtp.sendmail(sender, list(rcpts), MESSAGE)
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients


@pytest_twisted.ensureDeferred
async def test_first_attempt_deferred_retry_accepted_with_header(qpconn_server, tmp_path):
    server = start(qpconn_server, tmp_path, "0")

    refused = await in_thread(send, server)
    assert refused == {"user@mx.test": (450, b"4.7.1 Greylisted, please try again later")}
    assert server.messages() == []

    assert await in_thread(send, server) == {}
    (message,) = server.messages()
    head = message.partition(b"\n\n")[0]
    assert b"\nX-Greylist: delayed 0 seconds by greylist_lite" in head
    assert b"Subject: greylist test" in head

    # The triplet has passed: later mail goes through without a header.
    assert await in_thread(send, server) == {}
    assert b"X-Greylist" not in server.messages()[1]


@pytest_twisted.ensureDeferred
async def test_each_triplet_is_greylisted_separately(qpconn_server, tmp_path):
    server = start(qpconn_server, tmp_path, "0")
    assert await in_thread(send, server) != {}
    assert await in_thread(send, server) == {}

    # Same IP, other sender; same sender, other recipient: both new triplets.
    assert await in_thread(send, server, "other@example.org") != {}
    refused = await in_thread(send, server, "sender@example.org", ("user@mx.test", "b@mx.test"))
    assert list(refused) == ["b@mx.test"]
    assert len(server.messages()) == 2  # the second of these went to user@ only


@pytest_twisted.ensureDeferred
async def test_retry_before_delay_is_deferred_again_then_passes(qpconn_server, tmp_path):
    server = start(qpconn_server, tmp_path, "300")
    plugin = greylister(server)
    now = [1000.0]
    plugin.clock = lambda: now[0]

    assert await in_thread(send, server) != {}
    now[0] += 100
    refused = await in_thread(send, server)
    assert refused == {"user@mx.test": (450, b"4.7.1 Greylisted, try again in 201s")}
    now[0] += 250
    assert await in_thread(send, server) == {}
    assert b"X-Greylist: delayed 350 seconds by greylist_lite" in server.messages()[0]


@pytest_twisted.ensureDeferred
async def test_triplet_forgotten_after_lifetime(qpconn_server, tmp_path):
    server = start(qpconn_server, tmp_path, "10", "3600")
    plugin = greylister(server)
    now = [plugin.last_prune]
    plugin.clock = lambda: now[0]

    assert await in_thread(send, server) != {}
    now[0] += 20
    assert await in_thread(send, server) == {}
    now[0] += 3601
    assert await in_thread(send, server) != {}  # greylisted afresh
    assert len(plugin.seen) == 1


@pytest_twisted.ensureDeferred
async def test_relay_clients_are_not_greylisted(qpconn_server, tmp_path):
    server = start(qpconn_server, tmp_path, "300", files={"relayclients": ["127.0.0.1"]})
    assert await in_thread(send, server, rcpts=("someone@elsewhere.example",)) == {}
    assert b"X-Greylist" not in server.messages()[0]


@pytest_twisted.ensureDeferred
async def test_foreign_recipient_still_refused_by_rcpt_ok_after_passing(qpconn_server, tmp_path):
    server = start(qpconn_server, tmp_path, "0")
    rcpts = ("user@elsewhere.example",)
    first = await in_thread(send, server, rcpts=rcpts)
    assert first["user@elsewhere.example"][0] == 450
    second = await in_thread(send, server, rcpts=rcpts)
    assert second == {"user@elsewhere.example": (550, b"5.7.1 Relaying denied")}


@pytest.mark.parametrize("args", [("-1",), ("600", "300"), ("soon",)])
def test_bad_arguments_stop_loading(tmp_path, args):
    with pytest.raises(PluginLoadError, match=PLUGIN):
        load_plugin(Config(tmp_path), PLUGIN, *args)
