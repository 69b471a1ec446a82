"""What the server logs about a session: its structured events and the lines they read as.

Pins the fields every session event carries, the one summary line per transaction, JSON
lines through ``twistd --logger``; and the lines themselves: one when a connection starts
and one when it ends, one per transaction accepted or refused, each carrying the
connection's id in its text (so ``grep`` on the id gives the whole story of a connection),
distinct ids for distinct connections, and nothing on stdout or stderr (a daemon's standard
streams are not its log).
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from qpconn import DENY, DENYSOFT
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


# -- the lines of one connection, by its id -----------------------------------------------------
class RefuseSome(Plugin):
    """mail: refuses spam@ senders; data_post: refuses messages whose subject says reject."""

    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        return (DENY, "5.7.1 not you") if sender.user == "spam" else None

    def hook_data_post(self, transaction: Any) -> Any:
        subject = transaction.header.get("Subject") or ""
        return (DENY, "5.7.1 no thanks") if "reject" in subject else None


@contextmanager
def server_log() -> Iterator[list[dict[str, Any]]]:
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


def lines_of(events: list[dict[str, Any]], conn_id: str) -> list[str]:
    return [formatEvent(e) for e in events if e.get("conn_id") == conn_id]


@pytest_twisted.ensureDeferred
async def test_connection_and_transaction_lines_carry_the_connection_id(qpconn_server, capfd):
    server = qpconn_server(plugins=[RefuseSome, "relay", "rcpt_ok", "queue/discard"])
    seen: list[str] = []

    def watcher(event: dict[str, Any]) -> None:
        if event.get("conn_id") and "connect from" in str(event.get("log_format", "")):
            seen.append(event["conn_id"])

    def client() -> None:
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.sendmail("good@example.org", ["user@mx.test"], b"Subject: fine\r\n\r\nhi\r\n")
            try:
                smtp.sendmail("good@example.org", ["user@mx.test"], b"Subject: reject\r\n\r\nx\r\n")
            except smtplib.SMTPDataError as exc:
                assert exc.smtp_code == 552
            assert smtp.mail("spam@example.org")[0] == 550

    with server_log() as events:
        globalLogPublisher.addObserver(watcher)
        try:
            await in_thread(client)
            await server.wait_sessions_closed()
        finally:
            globalLogPublisher.removeObserver(watcher)

    (conn_id,) = seen
    lines = lines_of(events, conn_id)
    assert all(conn_id in line for line in lines), lines
    starts = [line for line in lines if " connect from 127.0.0.1:" in line]
    ends = [line for line in lines if line.endswith(" disconnect")]
    accepted = [line for line in lines if " accepted from=<good@example.org>" in line]
    rejected = [line for line in lines if " rejected from=<good@example.org>" in line]
    refused_mail = [line for line in lines if "rejected by RefuseSome: 550" in line]
    assert len(starts) == 1 and len(ends) == 1, lines
    assert len(accepted) == 1 and "reply=250" in accepted[0], lines
    assert len(rejected) == 1 and "reply=552" in rejected[0], lines
    assert len(refused_mail) == 1 and refused_mail[0].startswith(f"{conn_id} mail"), lines
    # The queue ids in the transaction lines start with the connection id, and differ.
    accepted_id, rejected_id = accepted[0].split()[1], rejected[0].split()[1]
    assert accepted_id.startswith(f"{conn_id}.") and rejected_id.startswith(f"{conn_id}.")
    assert accepted_id != rejected_id
    # A daemon writes nothing on its standard streams.
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


@pytest_twisted.ensureDeferred
async def test_two_connections_have_distinct_ids_in_their_lines(qpconn_server):
    server = qpconn_server(plugins=["rcpt_ok", "queue/discard"])

    def client() -> None:
        for _ in range(2):
            with smtplib.SMTP(*server.address, timeout=10) as smtp:
                smtp.sendmail("a@example.org", ["user@mx.test"], b"Subject: x\r\n\r\ny\r\n")

    with server_log() as events:
        await in_thread(client)
        await server.wait_sessions_closed()
    ids = [e["conn_id"] for e in events if "connect from" in str(e.get("log_format", ""))]
    assert len(ids) == 2 and ids[0] != ids[1]
    for conn_id in ids:
        lines = lines_of(events, conn_id)
        assert sum(" accepted from=<a@example.org>" in line for line in lines) == 1, lines
