"""queue/fork with a real server: several Maildirs, notes isolation, the failure policy.

The small plugins below are used as delivery paths by dotted name
(``tests.test_queue_fork:NoteWriter``), exactly as a config file would name them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from qpconn.config import Config
from qpconn.hooks.results import DECLINED, DENY, DENYSOFT, OK
from qpconn.mail.transaction import Transaction
from qpconn.plugins import Plugin, PluginLoadError, load_plugin
from qpconn.plugins.queue.fork import Fork, PathTransaction, split_paths
from tests.e2e_client import Client
from tests.support.server import in_thread

MESSAGE = b"Subject: forked\r\n\r\nbody line"  # Client.message adds CRLF . CRLF

#: What each path plugin saw, in call order; cleared for every test.
SEEN: list[dict[str, Any]] = []


class NoteWriter(Plugin):
    """A path that records what it sees, then writes notes and a header field."""

    def register(self, tag: str) -> None:
        self.tag = tag

    def hook_queue(self, transaction: Any) -> Any:
        SEEN.append(
            {
                "tag": self.tag,
                "notes": dict(transaction.notes),
                "conn_notes": dict(transaction.connection.notes),
                "x_path": transaction.header.get_all("X-Path"),
                "remote_ip": transaction.connection.remote_ip,
                "hello_host": transaction.connection.hello_host,
                "recipients": [r.address for r in transaction.recipients],
                "body": transaction.body_bytes(),
            }
        )
        transaction.notes["written_by"] = self.tag
        transaction.connection.notes["written_by"] = self.tag
        transaction.header.add("X-Path", self.tag)
        transaction.recipients.clear()
        return OK, f"2.0.0 stored by {self.tag}"


class Failing(Plugin):
    """A path that fails temporarily with its own reply."""

    def hook_queue(self, transaction: Any) -> Any:
        return DENYSOFT, "4.3.2 path is down"


class Refusing(Plugin):
    """A path that refuses permanently."""

    def hook_queue(self, transaction: Any) -> Any:
        return DENY, "5.7.1 not wanted here"


class Declining(Plugin):
    def hook_queue(self, transaction: Any) -> Any:
        return DECLINED


class Crashing(Plugin):
    def hook_queue(self, transaction: Any) -> Any:
        raise RuntimeError("boom")


class NoQueueHook(Plugin):
    def hook_connect(self, transaction: Any) -> None:
        return None


class SessionNotes(Plugin):
    """Outside the fork: seeds notes before queueing and reads them after."""

    def register(self) -> None:
        self.after: list[tuple[dict[str, Any], dict[str, Any], list[str]]] = []

    def hook_data_post(self, transaction: Any) -> None:
        transaction.notes["seed"] = "txn"
        transaction.connection.notes["seed"] = "conn"

    def hook_queue_post(self, transaction: Any) -> None:
        self.after.append(
            (
                dict(transaction.notes),
                dict(transaction.connection.notes),
                transaction.header.get_all("X-Path"),
            )
        )


@pytest.fixture(autouse=True)
def clear_seen() -> Iterator[None]:
    SEEN.clear()
    yield
    SEEN.clear()


@pytest.fixture
def errors() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if " fork: " in event.get("log_format", ""):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def send(address: tuple[str, int]) -> tuple[int, str]:
    with Client(address) as client:
        assert client.cmd("EHLO client.test").code == 250
        reply = client.transaction("<a@example.org>", ["<user@mx.test>"], MESSAGE)
        client.cmd("QUIT")
    return reply.code, reply.text


def maildir_messages(path: Path) -> list[bytes]:
    new = path / "new"
    return [(new / name).read_bytes() for name in sorted(os.listdir(new))] if new.is_dir() else []


def fork_server(qpconn_server: Any, line: str, *extra: Any) -> Any:
    return qpconn_server(plugins=[*extra, "relay", "rcpt_ok", line])


@pytest_twisted.ensureDeferred
async def test_two_maildirs_both_receive_the_message(qpconn_server, tmp_path):
    archive, inbox = tmp_path / "archive", tmp_path / "inbox"
    server = fork_server(
        qpconn_server, f"queue/fork queue/maildir {archive} -- queue/maildir {inbox}"
    )
    code, text = await in_thread(send, server.address)
    assert code == 250 and text.startswith("2.0.0 Queued as ")
    (first,) = maildir_messages(archive)
    (second,) = maildir_messages(inbox)
    assert first == second
    assert first.startswith(b"Return-Path: <a@example.org>\nDelivered-To: user@mx.test\n")
    assert b"\nReceived: from client.test (unknown [127.0.0.1])" in first
    assert first.endswith(b"\n\nbody line\n")


@pytest_twisted.ensureDeferred
async def test_paths_have_their_own_notes_header_and_connection(qpconn_server, tmp_path):
    session = SessionNotes(Config(None), "session_notes")
    line = (
        "queue/fork tests.test_queue_fork:NoteWriter one -- "
        "tests.test_queue_fork:NoteWriter two -- "
        f"queue/maildir {tmp_path / 'third'}"
    )
    server = fork_server(qpconn_server, line, session)
    code, _ = await in_thread(send, server.address)
    assert code == 250
    one, two = SEEN
    for seen in (one, two):
        # Each path starts from the session's notes, never from another path's writes.
        assert seen["notes"]["seed"] == "txn" and "written_by" not in seen["notes"]
        assert seen["conn_notes"]["seed"] == "conn" and "written_by" not in seen["conn_notes"]
        assert seen["x_path"] == []
        assert seen["recipients"] == ["user@mx.test"]
        assert seen["remote_ip"] == "127.0.0.1"
        assert seen["hello_host"] is None  # clone() keeps the peer, not the conversation
        assert seen["body"] == b"body line\r\n"
    # Nothing written by a path came back into the session.
    ((notes, conn_notes, x_path),) = session.after
    assert conn_notes["seed"] == "conn" and "written_by" not in conn_notes
    assert x_path == []
    assert "written_by" not in notes
    assert [entry["code"] for entry in notes["fork"]] == [250, 250, 250]
    # The third path's Maildir got the message as the session had it: no X-Path, the
    # recipients the writers cleared still there.
    (stored,) = maildir_messages(tmp_path / "third")
    assert b"X-Path" not in stored and b"Delivered-To: user@mx.test\n" in stored


@pytest_twisted.ensureDeferred
async def test_path_failing_after_another_succeeded_is_a_logged_temporary_failure(
    qpconn_server, tmp_path, errors
):
    archive = tmp_path / "archive"
    line = f"queue/fork queue/maildir {archive} -- tests.test_queue_fork:Failing"
    server = fork_server(qpconn_server, line)
    code, text = await in_thread(send, server.address)
    assert (code, text) == (452, "4.3.2 path is down")  # the failing path's own reply
    assert len(maildir_messages(archive)) == 1  # the client retries: a duplicate, no loss
    (event,) = errors
    assert event["path"] == "2:tests.test_queue_fork:Failing"
    assert event["accepted"] == f"1:queue/maildir {archive}"
    assert "duplicate" in event["log_format"]


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        pytest.param(["Refusing", "Refusing"], (552, "5.7.1 not wanted here"), id="all-permanent"),
        pytest.param(
            ["Refusing", "Failing"], (452, "4.3.2 path is down"), id="permanent+temporary"
        ),
        pytest.param(
            ["NoteWriter x", "Refusing"],
            (452, "4.3.0 Message could not be delivered everywhere; try again later"),
            id="accepted+permanent",
        ),
        pytest.param(
            ["Declining", "NoteWriter x"],
            (451, "4.3.0 Queuing declined or disabled; try again later"),
            id="declined",
        ),
        pytest.param(
            ["NoteWriter x", "Crashing"],
            (451, "4.3.0 Internal error - try again later"),
            id="crash",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_failure_policy(qpconn_server, paths, expected):
    line = "queue/fork " + " -- ".join(f"tests.test_queue_fork:{p}" for p in paths)
    server = fork_server(qpconn_server, line)
    assert await in_thread(send, server.address) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param([], "separated by --", id="nothing"),
        pytest.param(["queue/discard", "--"], "separated by --", id="trailing-separator"),
        pytest.param(["--", "queue/discard"], "separated by --", id="leading-separator"),
        pytest.param(["queue/no_such_thing"], "path 1", id="unknown-plugin"),
        pytest.param(
            ["queue/discard", "--", "tests.test_queue_fork:NoQueueHook"],
            "path 2: tests.test_queue_fork:NoQueueHook has no queue hook",
            id="no-queue-hook",
        ),
    ],
)
def test_bad_paths_are_refused_at_load_time(tmp_path, args, message):
    with pytest.raises(PluginLoadError, match=message):
        load_plugin(Config(None), "queue/fork", *args)


def test_split_paths():
    assert split_paths(["a", "x", "--", "b"]) == [["a", "x"], ["b"]]
    assert split_paths(["a"]) == [["a"]]


def test_fork_timeout_exceeds_its_paths():
    fork = load_plugin(Config(None), "queue/fork", "tests.test_queue_fork:Failing")
    assert isinstance(fork, Fork) and fork.timeout == 35.0


def test_path_transaction_shares_the_body_but_not_the_rest():
    from qpconn.mail.connection import Connection

    connection = Connection(remote_ip="127.0.0.9", hello_host="h.test")
    connection.notes["k"] = 1
    original = Transaction(connection, id="q1")
    original.body_write(b"Subject: s\r\n\r\nbody\r\n")
    original.end_of_data()
    original.notes["n"] = 1
    view = PathTransaction.of(original)
    assert view.id == "q1" and view.body_bytes() == b"body\r\n"
    assert view.connection is not connection and view.connection.remote_ip == "127.0.0.9"
    assert view.connection.hello_host is None
    view.notes["n"] = 2
    view.connection.notes["k"] = 2
    view.header.add("X-New", "1")
    view.close()  # a path closing its view must not release the session's body
    assert original.notes["n"] == 1 and connection.notes["k"] == 1
    assert "X-New" not in original.header
    assert connection.hello_host == "h.test"  # clone(no_reset=True) left it alone
    assert original.body_bytes() == b"body\r\n"
    with pytest.raises(RuntimeError):
        view.body_write(b"more")
    original.close()
