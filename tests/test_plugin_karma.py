"""karma and naughty end to end: a real qpconn remembering clients in a real SQLite file."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from tests.e2e_client import watch_errors
from tests.support.policy import codes, script, send_message, sessions_plugin
from tests.support.server import in_thread

#: three refusals by rcpt_ok (relaying denied): three bad points
BAD = ["EHLO c.test", "MAIL FROM:<a@example.org>"] + ["RCPT TO:<x@elsewhere.example>"] * 3


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


def start(qpconn_server: Any, line: str = "karma", *extra: str) -> Any:
    recorder = sessions_plugin()
    server = qpconn_server(
        plugins=["relay", line, *extra, "rcpt_ok", "queue/maildir maildir", recorder],
        files={"relayclients": ["127.0.0.9"]},
    )
    server.extra["sessions"] = recorder
    return server


def history(server: Any, ip: str, db: str = "karma.db") -> tuple[int, int, int] | None:
    # relative paths are taken from the working directory, the test's tmp_path
    path = os.path.join(os.path.dirname(server.config_dir), db)
    if not os.path.exists(path):
        return None
    with sqlite3.connect(path) as handle:
        return handle.execute(
            "SELECT good, bad, connections FROM karma WHERE ip = ?", (ip,)
        ).fetchone()


async def run(server: Any, source: str, commands: list[Any]) -> list[Any]:
    replies = await in_thread(script, server.address, source, commands)
    await server.wait_sessions_closed()
    return replies


async def good(server: Any, source: str) -> list[Any]:
    replies = await in_thread(
        send_message, server.address, source, "a@example.org", "u@mx.test", b"Subject: k\r\n\r\nk"
    )
    await server.wait_sessions_closed()
    return replies


@pytest_twisted.ensureDeferred
async def test_bad_clients_are_kept_out_good_ones_let_in(qpconn_server):
    server = start(qpconn_server, "karma db karma.db")
    assert codes(await run(server, "127.0.0.2", BAD)) == [220, 250, 250, 550, 550, 550]
    assert history(server, "127.0.0.2") == (0, 3, 1)
    replies = await run(server, "127.0.0.2", ["EHLO c.test"])
    assert codes(replies) == [450]
    assert replies[0].text == (
        "4.7.1 Your address 127.0.0.2 has a poor reputation here (karma -3); try again later"
    )
    # karma's own refusal is not held against the client
    assert history(server, "127.0.0.2") == (0, 3, 1)
    assert codes(await good(server, "127.0.0.3")) == [220, 250, 250, 250, 354, 250]
    assert history(server, "127.0.0.3") == (1, 0, 1)
    assert codes(await run(server, "127.0.0.3", BAD))[-1] == 550
    assert codes(await run(server, "127.0.0.3", [])) == [220]  # 1 good - 3 bad = -2
    verdict = server.extra["sessions"].of("karma")[0]
    assert (verdict["result"], verdict["reason"]) == ("pass", "karma -2")


@pytest_twisted.ensureDeferred
async def test_thresholds_and_penalty(qpconn_server):
    server = start(qpconn_server, "karma negative 5")
    await run(server, "127.0.0.2", BAD)
    assert codes(await run(server, "127.0.0.2", BAD)) == [220, 250, 250, 550, 550, 550]
    assert codes(await run(server, "127.0.0.2", [])) == [450]
    server = start(qpconn_server, "karma penalty_days 0")  # the same file: -6, but forgiven
    assert codes(await run(server, "127.0.0.2", [])) == [220]


@pytest_twisted.ensureDeferred
async def test_reject_naughty_and_reject_0(qpconn_server):
    server = start(qpconn_server, "karma reject naughty", "naughty")
    await run(server, "127.0.0.2", BAD)
    commands = ["EHLO c.test", "MAIL FROM:<a@example.org>", "RCPT TO:<u@mx.test>"]
    replies = await run(server, "127.0.0.2", commands)
    assert codes(replies) == [220, 250, 250, 450]
    assert replies[-1].text.startswith("4.7.1 Your address 127.0.0.2 has a poor reputation")
    assert history(server, "127.0.0.2") == (0, 3, 1)  # naughty gave karma's refusal: not counted
    server = start(qpconn_server, "karma reject 0")
    assert codes(await run(server, "127.0.0.2", commands)) == [220, 250, 250, 250]
    assert server.extra["sessions"].of("karma")[0]["action"] == "log"


@pytest_twisted.ensureDeferred
async def test_relay_clients_neither_judged_nor_scored_and_a_bad_db_judges_nobody(
    qpconn_server, tmp_path
):
    server = start(qpconn_server)
    await run(server, "127.0.0.9", ["EHLO c.test", "MAIL FROM:<a@b.example>", "RCPT TO:<>"])
    assert history(server, "127.0.0.9") is None
    (tmp_path / "dir.db").mkdir()
    server = start(qpconn_server, "karma db dir.db")
    assert codes(await run(server, "127.0.0.2", BAD)) == [220, 250, 250, 550, 550, 550]
    assert codes(await run(server, "127.0.0.2", [])) == [220]
    assert server.extra["sessions"].of("karma")[0]["result"] == "temperror"


def test_arguments():
    for args in (("negative", "x"), ("reject", "maybe"), ("db",)):
        with pytest.raises(PluginLoadError):
            load_plugin(Config(None), "karma", *args)
    for args in (("reject", "later"), ("rcpt", "data")):
        with pytest.raises(PluginLoadError):
            load_plugin(Config(None), "naughty", *args)


@pytest.mark.parametrize(
    ("stage", "expected"),
    [("mail", [220, 250, 550, 503, 503]), ("rcpt", [220, 250, 250, 550, 554]),
     ("data", [220, 250, 250, 250, 554]), ("data_post", [220, 250, 250, 250, 354, 552])],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_naughty_stages(qpconn_server, stage, expected):
    server = qpconn_server(
        plugins=["helo reject naughty", f"naughty {stage}", "rcpt_ok", "queue/maildir maildir"],
        files={"badhelo": ["bad.test"]},
    )
    commands = ["EHLO bad.test", "MAIL FROM:<a@b.example>", "RCPT TO:<u@mx.test>", "DATA",
                b"Subject: x\r\n\r\nx"]  # fmt: skip
    replies = await run(server, "127.0.0.2", commands)
    assert codes(replies) == expected
    refusal = next(r for r in replies if r.code >= 550)
    assert refusal.text == "5.7.1 HELO name bad.test is not accepted here"
    assert server.messages() == []


@pytest_twisted.ensureDeferred
async def test_greylisting_deferrals_are_not_held_against_a_new_sender(qpconn_server):
    rcpts = [f"RCPT TO:<u{n}@mx.test>" for n in range(3)]
    commands = ["EHLO c.test", "MAIL FROM:<a@example.org>", *rcpts]
    server = start(qpconn_server, "karma", "greylisting")
    assert codes(await run(server, "127.0.0.2", commands)) == [220, 250, 250, 450, 450, 450]
    assert history(server, "127.0.0.2") is None  # nothing scored
    assert codes(await run(server, "127.0.0.2", [])) == [220]
    server = start(qpconn_server, "karma ignore none", "greylisting")
    await run(server, "127.0.0.3", commands)
    assert history(server, "127.0.0.3") == (0, 3, 1)
