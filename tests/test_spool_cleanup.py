"""Spool files are removed however a transaction ends, and stale ones at start-up.

A small ``size_threshold`` makes every test message spool to ``spool_dir``; the tests
watch that directory while the real server handles the session.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from qpconn.hooks.results import DENY
from qpconn.mail.spool import clean_stale_spool
from qpconn.plugins import Plugin
from tests.e2e_client import Client
from tests.support.server import in_thread
from tests.support.timing import wait_until

BIG = b"Subject: spooled\r\n\r\n" + b"\r\n".join([b"s" * 500] * 40)  # ~20 KB


class RefuseAtDataPost(Plugin):
    def hook_data_post(self, transaction: Any) -> Any:
        return DENY, "5.7.1 not this one"


def spool_server(qpconn_server: Any, tmp_path: Path, plugins: list[Any] | None = None) -> Any:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    files = {"spool_dir": str(spool), "size_threshold": "1024"}
    return qpconn_server(files=files, plugins=plugins)


def spooled(tmp_path: Path) -> list[str]:
    return os.listdir(tmp_path / "spool")


def begin_data(client: Client) -> None:
    assert client.cmd("EHLO client.test").code == 250
    assert client.cmd("MAIL FROM:<a@example.org>").code == 250
    assert client.cmd("RCPT TO:<user@mx.test>").code == 250
    assert client.cmd("DATA").code == 354
    client.send(BIG + b"\r\n")


@pytest_twisted.ensureDeferred
async def test_spool_removed_after_an_accepted_message(qpconn_server, tmp_path):
    server = spool_server(qpconn_server, tmp_path)

    def session() -> None:
        with Client(server.address) as client:
            begin_data(client)
            assert wait_until(lambda: len(spooled(tmp_path)) == 1)  # it did spool
            assert client.message(b"last line").code == 250
            assert spooled(tmp_path) == []
            client.cmd("QUIT")

    await in_thread(session)
    (stored,) = server.messages()
    assert stored.endswith(BIG.replace(b"\r\n", b"\n") + b"\nlast line\n")


@pytest.mark.parametrize("ending", ["disconnect", "refused", "queue-failure"])
@pytest_twisted.ensureDeferred
async def test_spool_removed_however_the_transaction_ends(qpconn_server, tmp_path, ending):
    plugins: list[Any] | None = None
    if ending == "refused":
        plugins = ["relay", "rcpt_ok", RefuseAtDataPost, "queue/discard"]
    elif ending == "queue-failure":
        plugins = ["relay", "rcpt_ok"]  # no queue plugin: 451
    server = spool_server(qpconn_server, tmp_path, plugins)

    def session() -> None:
        client = Client(server.address)
        begin_data(client)
        assert wait_until(lambda: len(spooled(tmp_path)) == 1)
        if ending == "disconnect":
            client.close()
        else:
            code = client.message(b"end").code
            assert code == (552 if ending == "refused" else 451)
            # RSET and a second transaction on the same connection leave nothing either.
            assert client.cmd("RSET").code == 250
            client.cmd("QUIT")
            client.close()
        assert wait_until(lambda: spooled(tmp_path) == [])

    await in_thread(session)
    await server.wait_sessions_closed()
    assert spooled(tmp_path) == []


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest_twisted.ensureDeferred
async def test_stale_spool_files_of_dead_processes_are_removed_at_start(qpconn_server, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    dead = dead_pid()
    stale = spool / f"qpconn-{dead}-abc123.spool"
    live = spool / "qpconn-1-def456.spool"  # pid 1 is alive: a sibling's file, kept
    own = spool / f"qpconn-{os.getpid()}-ghi789.spool"  # ours: in use, kept
    other = spool / "notes.txt"
    for path in (stale, live, own, other):
        path.write_bytes(b"partial body")
    server = spool_server(qpconn_server, tmp_path)
    assert sorted(os.listdir(spool)) == sorted(p.name for p in (live, own, other))
    code = await in_thread(lambda: Client(server.address).cmd("QUIT").code)
    assert code == 221
    assert clean_stale_spool(str(spool)) == []
    assert clean_stale_spool(str(tmp_path / "missing")) == []


@pytest_twisted.ensureDeferred
async def test_spool_removed_by_rset_between_bdat_chunks(qpconn_server, tmp_path):
    server = spool_server(qpconn_server, tmp_path)

    def session() -> None:
        with Client(server.address) as client:
            assert "CHUNKING" in client.cmd("EHLO client.test").lines
            assert client.cmd("MAIL FROM:<a@example.org>").code == 250
            assert client.cmd("RCPT TO:<user@mx.test>").code == 250
            client.send(b"BDAT %d\r\n" % len(BIG) + BIG)
            assert client.reply().code == 250
            assert wait_until(lambda: len(spooled(tmp_path)) == 1)
            assert client.cmd("RSET").code == 250
            assert spooled(tmp_path) == []
            client.cmd("QUIT")

    await in_thread(session)
    assert spooled(tmp_path) == [] and server.messages() == []
