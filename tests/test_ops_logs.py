"""Structured log events: the fields every session event carries, the one summary line per
transaction, and JSON lines through ``twistd --logger``."""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from qpconn import DENYSOFT
from qpconn.plugins import Plugin
from tests.support.process import free_port, running, twistd_command
from tests.support.server import in_thread


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


class Broken(Plugin):
    """Fails at MAIL for one sender, to show a failure's fields."""

    def hook_mail(self, transaction, sender, params):
        if sender.user == "crash":
            raise RuntimeError("plugin bug")
        return None


class Busy(Plugin):
    def hook_queue(self, transaction):
        return DENYSOFT, "4.3.0 try later"


@pytest_twisted.ensureDeferred
async def test_session_events_carry_connection_transaction_and_peer(
    qpconn_server, tmp_path, events
):
    server = qpconn_server(plugins=[Broken, "rcpt_ok", f"queue/maildir {tmp_path / 'maildir'}"])

    def client() -> None:
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("crash@example.org")[0] == 451
            smtp.mail("a@example.org")
            assert smtp.rcpt("nobody@elsewhere.example")[0] == 550
            smtp.rcpt("u@mx.test")
            smtp.rcpt("v@mx.test")
            assert smtp.data(b"Subject: logs\r\n\r\nhello\r\n")[0] == 250

    await in_thread(client)
    await server.wait_sessions_closed()
    mine = [
        e
        for e in events
        if getattr(e.get("log_source"), "factory", None) is server.factory
        or e.get("log_namespace") == "qpconn.hooks"
    ]
    (connect,) = [e for e in mine if " connect from " in formatEvent(e)]
    conn_id = connect["conn_id"]
    assert connect["remote_ip"] == "127.0.0.1"
    assert connect["txn_id"].startswith(conn_id + ".")

    (failure,) = [e for e in mine if e.get("log_namespace") == "qpconn.hooks"]
    assert (failure["conn_id"], failure["hook"], failure["plugin"]) == (conn_id, "mail", "Broken")
    assert failure["result"] == "error" and failure["remote_ip"] == "127.0.0.1"
    assert "RuntimeError: plugin bug" in failure["log_failure"].getTraceback()

    refused_mail, refused = [e for e in mine if e.get("event") == "rejection"]
    assert (refused_mail["hook"], refused_mail["plugin"], refused_mail["code"]) == (
        "mail",
        "Broken",
        451,
    )
    assert refused["hook"] == "rcpt" and refused["plugin"] == "rcpt_ok"
    assert refused["result"] == "rejected" and refused["code"] == 550
    assert refused["rcpt"] == "<nobody@elsewhere.example>"

    (summary,) = [e for e in mine if e.get("event") == "transaction"]
    assert summary["conn_id"] == conn_id and summary["txn_id"] == summary["queue_id"]
    assert summary["queue_id"] == refused["txn_id"]  # the same transaction, start to end
    assert summary["sender"] == "<a@example.org>"
    assert summary["rcpts"] == "<u@mx.test>,<v@mx.test>" and summary["recipients"] == 2
    assert summary["size"] == len(b"Subject: logs\r\n\r\nhello\r\n")
    assert (summary["result"], summary["hook"], summary["plugin"]) == (
        "accepted",
        "queue",
        "queue/maildir",
    )
    assert summary["elapsed"] >= 0
    line = formatEvent(summary)
    assert line.startswith(f"{conn_id} {summary['queue_id']} accepted from=<a@example.org> ")
    assert " to=<u@mx.test>,<v@mx.test> size=" in line and " reply=250 elapsed=" in line


@pytest_twisted.ensureDeferred
async def test_a_deferred_message_has_one_summary_naming_the_queue_plugin(qpconn_server, events):
    server = qpconn_server(plugins=["rcpt_ok", Busy])

    def client() -> int:
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("a@example.org")
            smtp.rcpt("u@mx.test")
            return smtp.data(b"Subject: x\r\n\r\ny\r\n")[0]

    assert await in_thread(client) == 452
    await server.wait_sessions_closed()
    summaries = [
        e
        for e in events
        if e.get("event") == "transaction"
        and getattr(e.get("log_source"), "factory", None) is server.factory
    ]
    (summary,) = summaries
    assert (summary["result"], summary["hook"], summary["plugin"], summary["code"]) == (
        "rejected",
        "queue",
        "Busy",
        452,
    )


def test_twistd_logger_writes_json_lines_with_every_field(tmp_path):
    port = free_port()
    command = twistd_command(
        "--logger=qpconn.log.observers.json_file",
        "qpconn",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--no-rdns",
    )
    env = {"QPCONN_JSON_LOG": str(tmp_path / "events.json")}
    with running(command, port, str(tmp_path), env), smtplib.SMTP("127.0.0.1", port) as smtp:
        smtp.ehlo("client.test")
        smtp.sendmail("a@example.org", ["u@localhost"], b"Subject: j\r\n\r\nhi\r\n")
    lines = (tmp_path / "events.json").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    (summary,) = [r for r in records if r.get("event") == "transaction"]
    assert summary["sender"] == "<a@example.org>" and summary["rcpts"] == "<u@localhost>"
    assert summary["result"] == "accepted" and summary["remote_ip"] == "127.0.0.1"
    assert summary["txn_id"] == summary["queue_id"]
    assert summary["queue_id"].startswith(summary["conn_id"] + ".")
    assert summary["log_level"]["name"] == "info"
    assert summary["log_namespace"] == "qpconn.server.protocol.SMTPServerProtocol"
