"""Issue 2, "Logging through twisted.logger": what the server logs about a session.

One line when a connection starts and one when it ends, one line per transaction that
was accepted or refused, each carrying the connection's id in its text (so ``grep`` on
the id gives the whole story of a connection). Nothing reaches stdout or stderr through
``print``: a daemon's standard streams are not its log.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from qpconn import DENY
from qpconn.plugins import Plugin
from tests.support.server import in_thread


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
