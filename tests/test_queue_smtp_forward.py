"""queue/smtp-forward end to end: a real qpconn forwarding to real next hops on loopback.

The next hops are aiosmtpd (a real, independent SMTP server) with a handler whose replies
each test sets, and raw scripted servers for what no real server does on purpose: hang,
or drop the connection in the middle of DATA.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from tests.e2e_client import Client
from tests.support.nexthop import Recorder, ScriptedServer, aiosmtpd_next_hop
from tests.support.server import in_thread
from tests.support.timing import assert_within_timeout, wait_until

#: as sent after DATA (dot-stuffed): the message's second body line is ".dot line"
TEXT = b"Subject: forwarded\r\nMessage-ID: <m1@client.test>\r\n\r\nfirst line\r\n..dot line"


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Log events of the forwarding plugins (their namespace), for the queue id checks."""
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith("qpconn.plugin.queue/"):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def forwarder(qpconn_server: Any, port: int, *options: str) -> Any:
    line = " ".join(["queue/smtp-forward", "127.0.0.1", str(port), *options])
    return qpconn_server(plugins=["relay", "rcpt_ok", line])


def send(
    address: tuple[str, int],
    rcpts: list[str] | None = None,
    text: bytes = TEXT,
    sender: str = "<a@example.org>",
) -> tuple[int, str]:
    """One message through our server: the reply to the end of DATA."""
    with Client(address, timeout=15) as client:
        assert client.cmd("EHLO client.test").code == 250
        reply = client.transaction(sender, rcpts or ["<user@mx.test>"], text)
        client.cmd("QUIT")
    return reply.code, reply.text


@pytest_twisted.ensureDeferred
async def test_250_only_after_next_hop_250_with_its_queue_id(qpconn_server, events):
    with aiosmtpd_next_hop() as (hop, controller):
        server = forwarder(qpconn_server, controller.port)
        code, text = await in_thread(send, server.address, ["<user@mx.test>", "<b@mx.test>"])
        assert code == 250
        # Our queue id and the next hop's own words (its queue id) are in the reply...
        assert text.startswith("2.0.0 Queued as ")
        assert "said: 2.0.0 Ok: queued as NH1" in text
        (message,) = hop.messages
        assert message.sender == "a@example.org"
        assert message.recipients == ["user@mx.test", "b@mx.test"]
        # ...the text arrived intact: dot-stuffing undone by the next hop, our Received on top.
        assert message.content.startswith(b"Received: from client.test")
        assert message.content.endswith(b"\r\n\r\nfirst line\r\n.dot line\r\n")
        assert b"Message-ID: <m1@client.test>" in message.content
    # ...and in the log, next to our queue id.
    (logged,) = [e for e in events if "verdict" in e]
    assert "queued as NH1" in logged["verdict"] and logged["queue_id"] in text


@pytest_twisted.ensureDeferred
async def test_burst_reuses_pooled_connections(qpconn_server):
    with aiosmtpd_next_hop() as (hop, controller):
        server = forwarder(qpconn_server, controller.port, "pool=2")
        # 8 messages, 2 sessions at a time: no more than a handful of connections.
        sent = 0
        for _ in range(4):
            pair = [in_thread(send, server.address), in_thread(send, server.address)]
            for deferred in pair:
                assert (await deferred)[0] == 250
                sent += 1
        assert len(hop.messages) == sent == 8
        assert len(hop.hellos) < sent
        assert len(hop.hellos) <= 4
        assert "RSET" in hop.commands  # a reused connection is checked with RSET first


@pytest_twisted.ensureDeferred
async def test_sequential_messages_share_one_connection(qpconn_server):
    with aiosmtpd_next_hop() as (hop, controller):
        server = forwarder(qpconn_server, controller.port)
        for _ in range(5):
            assert (await in_thread(send, server.address))[0] == 250
        assert len(hop.messages) == 5
        assert len(hop.hellos) == 1
        assert hop.commands.count("RSET") == 4
        pool = server.factory.plugins[-1].pool
        assert pool.opened == 1
        # Small command writes must not wait for delayed ACKs (Nagle): ~40 ms a message.
        ((client, _),) = pool._idle
        handle = client.protocol.transport.getHandle()
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest_twisted.ensureDeferred
async def test_next_hop_closing_an_idle_connection_is_not_an_error(qpconn_server):
    # aiosmtpd's own idle timeout closes the pooled connection between the messages (1 s:
    # long enough that no pause inside a delivery on a slow machine reaches it).
    with aiosmtpd_next_hop(timeout=1.0) as (hop, controller):
        server = forwarder(qpconn_server, controller.port)
        assert (await in_thread(send, server.address))[0] == 250
        pool = server.factory.plugins[-1].pool
        ((idle, _),) = pool._idle
        # until the next hop's close reached us
        assert await in_thread(wait_until, lambda: idle.protocol.lost)
        assert (await in_thread(send, server.address))[0] == 250
        assert len(hop.messages) == 2 and len(hop.hellos) == 2


@pytest.mark.parametrize(
    ("recorder", "expected"),
    [
        pytest.param(
            Recorder(rcpt_replies={"user@mx.test": "450 4.2.1 Mailbox busy"}),
            (450, "4.2.1 Mailbox busy"),
            id="rcpt-4xx",
        ),
        pytest.param(
            Recorder(rcpt_replies={"user@mx.test": "550 5.1.1 No such user"}),
            (550, "5.1.1 No such user"),
            id="rcpt-5xx",
        ),
        pytest.param(
            Recorder(mail_reply="451 4.3.0 Try later"), (451, "4.3.0 Try later"), id="mail-4xx"
        ),
        pytest.param(
            Recorder(mail_reply="553 5.7.1 Sender refused"),
            (553, "5.7.1 Sender refused"),
            id="mail-5xx",
        ),
        pytest.param(
            Recorder(data_reply="452 4.3.1 Queue full"), (452, "4.3.1 Queue full"), id="data-4xx"
        ),
        pytest.param(
            Recorder(data_reply="554 5.7.1 Looks like spam"),
            (554, "5.7.1 Looks like spam"),
            id="data-5xx",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_next_hop_refusal_becomes_ours(qpconn_server, recorder, expected):
    with aiosmtpd_next_hop(recorder) as (hop, controller):
        server = forwarder(qpconn_server, controller.port)
        assert await in_thread(send, server.address) == expected
        assert hop.messages == []
        # The refusal did not cost the connection: the next message reuses it.
        recorder.mail_reply = recorder.data_reply = None
        recorder.rcpt_replies.clear()
        assert (await in_thread(send, server.address))[0] == 250
        assert len(hop.hellos) == 1


@pytest_twisted.ensureDeferred
async def test_some_recipients_refused_permanently_get_a_bounce(qpconn_server):
    recorder = Recorder(rcpt_replies={"gone@mx.test": "550 5.1.1 <gone@mx.test> No such user"})
    with aiosmtpd_next_hop(recorder) as (hop, controller):
        server = forwarder(qpconn_server, controller.port)
        rcpts = ["<user@mx.test>", "<gone@mx.test>", "<b@mx.test>"]
        code, text = await in_thread(send, server.address, rcpts)
        assert code == 250, text
        message, bounce = hop.messages
        assert message.recipients == ["user@mx.test", "b@mx.test"]
        # The refused recipient is reported to the sender, from <>, before our 250.
        assert bounce.sender == "<>" and bounce.recipients == ["a@example.org"]
        assert b"Final-Recipient: rfc822; gone@mx.test" in bounce.content
        assert b"Status: 5.1.1" in bounce.content
        assert b"Message-ID: <m1@client.test>" in bounce.content


@pytest_twisted.ensureDeferred
async def test_one_recipient_refused_temporarily_sends_nothing(qpconn_server):
    recorder = Recorder(rcpt_replies={"b@mx.test": "451 4.3.0 Try b later"})
    with aiosmtpd_next_hop(recorder) as (hop, controller):
        server = forwarder(qpconn_server, controller.port)
        code, text = await in_thread(send, server.address, ["<user@mx.test>", "<b@mx.test>"])
        # The client keeps the whole message and retries: no loss, and no duplicate.
        assert code == 451 and text.startswith("4.3.0 Try b later"), text
        assert hop.messages == []
        assert "DATA" not in hop.commands


@pytest_twisted.ensureDeferred
async def test_next_hop_down_is_451(qpconn_server):
    from tests.support.process import free_port

    server = forwarder(qpconn_server, free_port(), "timeout=30")
    started = time.monotonic()
    code, text = await in_thread(send, server.address)
    assert code == 451 and text.startswith("4.4.1 Next hop 127.0.0.1:"), text
    assert "cannot connect" in text
    assert time.monotonic() - started < 15  # the refusal ended it, not the 30 s timeout


@pytest_twisted.ensureDeferred
async def test_next_hop_that_never_answers_is_451_within_the_timeout(qpconn_server):
    with ScriptedServer(lambda sock: hang.hang(sock)) as hang:
        server = forwarder(qpconn_server, hang.port, "timeout=1")
        started = time.monotonic()
        code, text = await in_thread(send, server.address)
        elapsed = time.monotonic() - started
    assert code == 451 and "timed out" in text, text
    assert_within_timeout(elapsed, fired=1.0, instead_of=60)  # timeout=1, not the default
    assert hang.accepted == 1


def _slow_final_reply(server: ScriptedServer, sock: Any, *, drop: bool) -> None:
    """Talk SMTP up to DATA; then drop the connection mid-message, or never answer the dot."""
    sock.sendall(b"220 hop.test ESMTP\r\n")
    for reply in (b"250 hop.test\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go ahead\r\n"):
        server.read_line(sock)
        sock.sendall(reply)
    server.read_line(sock)  # the first line of the message
    if drop:
        sock.close()
        return
    while server.read_line(sock) not in (b".\r\n", b""):
        pass
    server.hang(sock)


@pytest.mark.parametrize("drop", [True, False], ids=["drop-mid-data", "no-reply-to-dot"])
@pytest_twisted.ensureDeferred
async def test_next_hop_failing_during_data_is_451(qpconn_server, drop):
    with ScriptedServer(lambda sock: _slow_final_reply(hop, sock, drop=drop)) as hop:
        server = forwarder(qpconn_server, hop.port, "timeout=1.5")
        started = time.monotonic()
        code, text = await in_thread(send, server.address)
        elapsed = time.monotonic() - started
    assert code == 451 and text.startswith("4.4.1 Next hop"), text
    assert elapsed < 30  # the drop or timeout=1.5 ended it, not the 60 s default
    assert b"DATA\r\n" in hop.received


@pytest_twisted.ensureDeferred
async def test_large_spooled_message_is_forwarded_intact(qpconn_server):
    body = b"".join(b".line %06d %s\r\n" % (i, b"x" * 60) for i in range(30000))
    with aiosmtpd_next_hop(data_size_limit=0) as (hop, controller):
        server = qpconn_server(
            files={"size_threshold": "65536"},
            plugins=["relay", "rcpt_ok", f"queue/smtp-forward 127.0.0.1 {controller.port}"],
        )
        stuffed = (b"Subject: big\r\n\r\n" + body).replace(b"\r\n.", b"\r\n..")
        code, _ = await in_thread(send, server.address, None, stuffed[:-2])
        assert code == 250
        (message,) = hop.messages
    assert message.content.endswith(b"\r\n\r\n" + body)
    assert len(body) > 2_000_000


@pytest_twisted.ensureDeferred
async def test_starttls_to_the_next_hop(qpconn_server, tmp_path):
    import ssl

    from tests.support.certs import self_signed

    cert, key = self_signed(str(tmp_path))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with aiosmtpd_next_hop(tls_context=context, require_starttls=True) as (hop, controller):
        # The next hop refuses MAIL before STARTTLS, so a 250 proves the channel was TLS.
        server = forwarder(qpconn_server, controller.port, "starttls=required", f"tls_ca={cert}")
        code, text = await in_thread(send, server.address)
        assert code == 250, text
        assert len(hop.messages) == 1


@pytest_twisted.ensureDeferred
async def test_starttls_required_but_not_offered_is_451(qpconn_server, tmp_path):
    with aiosmtpd_next_hop() as (hop, controller):
        server = forwarder(qpconn_server, controller.port, "starttls=required")
        code, text = await in_thread(send, server.address)
        assert code == 451 and "does not offer STARTTLS" in text, text
        assert hop.messages == []


@pytest_twisted.ensureDeferred
async def test_starttls_with_an_untrusted_certificate_is_451_naming_the_certificate(
    qpconn_server, tmp_path, events
):
    import ssl

    from tests.support.certs import self_signed

    os.makedirs(tmp_path / "other")
    cert, key = self_signed(str(tmp_path))
    other, _ = self_signed(str(tmp_path / "other"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with aiosmtpd_next_hop(tls_context=context, require_starttls=True) as (hop, controller):
        server = forwarder(
            qpconn_server, controller.port, "starttls=required", f"tls_ca={other}", "timeout=30"
        )
        code, text = await in_thread(send, server.address)
        assert code == 451, text
        assert hop.messages == []
    # Our own verification failed: the reply and the log say so, and do not blame the hop.
    why = "TLS certificate verification failed: self-signed certificate (depth 0, CN=localhost)"
    assert text.startswith(f"4.7.5 Next hop 127.0.0.1:{controller.port} unavailable ({why})")
    assert "closed by the next hop" not in text
    (logged,) = [e for e in events if "not delivered" in e["log_format"]]
    assert logged["reason"] == why


@pytest_twisted.ensureDeferred
async def test_starttls_to_a_certificate_for_another_name_is_451_naming_the_mismatch(
    qpconn_server, tmp_path, events
):
    """The certificate is signed by the CA we trust but names ``other.test`` only."""
    import datetime
    import ssl

    from cryptography import x509

    from tests.support.tlscerts import (
        cert_pem,
        certificate,
        common_name,
        key_pem,
        new_key,
        write_files,
    )

    ca_key, key = new_key(), new_key()
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))
    ca = certificate("mismatch CA", common_name("mismatch CA"), ca_key.public_key(), ca_key,
                     valid, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    leaf = certificate("other.test", ca.subject, key.public_key(), ca_key, valid,
                       [(x509.SubjectAlternativeName([x509.DNSName("other.test")]), False)])
    ca_file, cert_file, key_file = (str(tmp_path / n) for n in ("mca.pem", "mc.pem", "mk.pem"))
    write_files((ca_file, cert_pem(ca)), (cert_file, cert_pem(leaf)), (key_file, key_pem(key)))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    with aiosmtpd_next_hop(tls_context=context, require_starttls=True) as (hop, controller):
        server = forwarder(
            qpconn_server, controller.port, "starttls=required", f"tls_ca={ca_file}", "timeout=3"
        )
        code, text = await in_thread(send, server.address)
        assert code == 451, text
        assert hop.messages == []
    why = "TLS certificate verification failed: the certificate (CN=other.test) does not name"
    assert text.startswith(f"4.7.5 Next hop 127.0.0.1:{controller.port} unavailable ({why} "
                           "127.0.0.1)"), text  # fmt: skip
    (logged,) = [e for e in events if "not delivered" in e["log_format"]]
    assert logged["reason"].startswith(why)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param([], "expects HOST", id="no-host"),
        pytest.param(["h", "25", "x"], "expects HOST", id="too-many"),
        pytest.param(["h", "port"], "not a port number", id="bad-port"),
        pytest.param(["h", "starttls=maybe"], "starttls='maybe'", id="bad-starttls"),
        pytest.param(["h", "timeout=-1"], "must be positive", id="bad-timeout"),
        pytest.param(["h", "colour=blue"], "unknown option", id="unknown-option"),
    ],
)
def test_bad_arguments_stop_the_start(args, message):
    with pytest.raises(PluginLoadError, match=message):
        load_plugin(Config(None), "queue/smtp-forward", *args)


def test_arguments_are_read():
    plugin = load_plugin(
        Config(None), "queue/smtp-forward", "[::1]", "2525", "timeout=7", "pool=3", "idle=9"
    )
    assert plugin.destination.label == "[::1]:2525"
    assert plugin.delivery_timeout == 7.0 and plugin._pool_settings == (3, 9.0)
    assert load_plugin(Config(None), "queue/smtp-forward", "mx.test").destination.port == 25

