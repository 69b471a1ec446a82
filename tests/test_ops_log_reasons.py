"""Log lines an operator can act on: every refusal and every session the server closed says
why, with the real size; Twisted's per-port chatter stays below ``info``; the server says
where it listens; ``twistd qpconn --version`` names qpconn.

The in-process tests read the events a real server (in the test's reactor) publishes, as
tests/test_ops_logs.py does; the twistd tests read the text log of a real ``twistd``.
"""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from qpconn import __version__
from tests.e2e_client import Client
from tests.support.dnsserver import start_dns_server
from tests.support.process import free_port, running, twistd_command
from tests.support.server import in_thread


@contextmanager
def qpconn_lines() -> Iterator[list[dict[str, Any]]]:
    """Every event logged under the ``qpconn`` namespaces while the block runs."""
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith("qpconn"):
            events.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def texts(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events]


@pytest_twisted.ensureDeferred
async def test_a_session_closed_for_unknown_commands_says_why(qpconn_server):
    server = qpconn_server(plugins=["count_unrecognized_commands 2", "rcpt_ok"])

    def client() -> list[int]:
        with Client(server.address) as smtp:
            return [smtp.cmd("BOGUS").code, smtp.cmd("WRONG").code]

    with qpconn_lines() as events:
        assert await in_thread(client) == [500, 521]
        await server.wait_sessions_closed()
    lines = texts(events)
    # the first gets the plain 500 (the plugin only counts it): no line of its own
    (refusal,) = [line for line in lines if "unrecognized_command rejected by" in line]
    assert "rejected by count_unrecognized_commands: 521 " in refusal
    assert refusal.endswith(" (closing the connection)")
    (closed,) = [line for line in lines if " disconnect" in line]
    assert closed.endswith(
        " disconnect: closed by the server after 521 5.5.1 Closing connection:"
        " 2 unrecognized commands"
    )
    event = [e for e in events if e.get("event") == "rejection"][-1]
    assert (event["hook"], event["plugin"], event["code"]) == (
        "unrecognized_command", "count_unrecognized_commands", 521
    )  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_a_size_refused_at_mail_and_a_recipient_past_max_rcpt_are_logged(qpconn_server):
    server = qpconn_server(files={"databytes": "1000", "max_rcpt": "1"})

    def client() -> list[int]:
        with Client(server.address) as smtp:
            smtp.cmd("EHLO client.test")
            big = smtp.cmd("MAIL FROM:<a@example.org> SIZE=5000").code
            smtp.cmd("MAIL FROM:<a@example.org> SIZE=10")
            return [big, smtp.cmd("RCPT TO:<u@mx.test>").code, smtp.cmd("RCPT TO:<v@mx.test>").code]

    with qpconn_lines() as events:
        assert await in_thread(client) == [552, 250, 452]
        await server.wait_sessions_closed()
    refusals = [e for e in events if e.get("event") == "rejection"]
    size, rcpt = refusals
    assert (size["hook"], size["limit"], size["code"], size["size"]) == (
        "mail",
        "databytes",
        552,
        "5000",
    )
    assert formatEvent(size).endswith(
        " mail refused by the databytes limit: 552 Message size exceeds fixed maximum message size"
    )
    assert size["sender"] == "<a@example.org>" and size["databytes"] == 1000
    assert (rcpt["hook"], rcpt["limit"], rcpt["code"]) == ("rcpt", "max_rcpt", 452)
    assert " rcpt refused by the max_rcpt limit: 452 Too many recipients" in formatEvent(rcpt)


@pytest_twisted.ensureDeferred
async def test_an_oversized_message_is_logged_with_the_size_received(qpconn_server):
    server = qpconn_server(files={"databytes": "1000"})
    text = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n"
    text = text * 60  # about 5 KB, five times databytes

    def client() -> int:
        with Client(server.address) as smtp:
            smtp.cmd("EHLO client.test")
            smtp.cmd("MAIL FROM:<a@example.org>")
            smtp.cmd("RCPT TO:<u@mx.test>")
            smtp.cmd("DATA")
            return smtp.message(text).code

    with qpconn_lines() as events:
        assert await in_thread(client) == 552
        await server.wait_sessions_closed()
    (summary,) = [e for e in events if e.get("event") == "transaction"]
    assert summary["result"] == "rejected" and summary["code"] == 552
    assert summary["size"] == len(text) + 2  # the text and the CRLF before the end marker
    assert f" size={len(text) + 2} reply=552 " in formatEvent(summary)


# -- a real twistd ------------------------------------------------------------------------
def serve_and_send(tmp_path, loglevel: str, dns_port: int) -> str:
    """Run twistd with ``--dns-server``, deliver one message, return its text log."""
    config = tmp_path / f"config-{loglevel}"
    config.mkdir()
    (config / "loglevel").write_text(f"{loglevel}\n")
    (config / "plugins").write_text("rcpt_ok\nqueue/discard\n")
    port = free_port()
    command = twistd_command(
        "qpconn", "--config", str(config), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--dns-server", f"127.0.0.1:{dns_port}",
    )  # fmt: skip
    workdir = tmp_path / loglevel
    workdir.mkdir()
    with running(command, port, str(workdir)), smtplib.SMTP("127.0.0.1", port) as smtp:
        smtp.sendmail("a@example.org", ["u@localhost"], b"Subject: dns\r\n\r\nhi\r\n")
    return (workdir / "server.log").read_text()


@pytest_twisted.ensureDeferred
async def test_twistds_resolver_chatter_is_below_info_and_the_listener_names_its_address(
    tmp_path,
):
    dns = start_dns_server({"1.0.0.127.in-addr.arpa": [("PTR", "client.test.")],
                            "client.test": [("A", "127.0.0.1")]})  # fmt: skip
    try:
        dns_port = dns.address[1]
        debug = await in_thread(serve_and_send, tmp_path, "debug", dns_port)
        info = await in_thread(serve_and_send, tmp_path, "info", dns_port)
    finally:
        await dns.stop()
    # At debug Twisted's lines for each question's UDP port are there (the filter is what
    # keeps them out at info, not a quiet resolver) ...
    assert "(UDP Port " in debug and "DNSDatagramProtocol starting on " in debug, debug
    # ... and at info they are gone, while the session's own lines stay.
    assert "UDP Port" not in info and "DNSDatagramProtocol" not in info, info
    assert "connect from 127.0.0.1:" in info and "accepted from=<a@example.org>" in info, info
    for log in (debug, info):
        assert "listening on tcp:127.0.0.1:" in log, log
    assert "SMTPFactory starting on" not in info, info


def test_twistd_qpconn_version_names_qpconn_twisted_and_python():
    done = subprocess.run(
        twistd_command("qpconn", "--version"), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"qpconn {__version__} (Twisted ")
    assert ", Python 3." in done.stdout
