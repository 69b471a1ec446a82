"""greylisting end to end: a real qpconn keeping triplets in a real SQLite file.

Time passing is simulated by moving the recorded times back in the database file, as
the hours a real sender's queue waits cannot be waited in a test.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from qpconn.plugins.greylisting import triplet_network
from tests.e2e_client import watch_errors
from tests.support.policy import codes, script, sessions_plugin
from tests.support.server import in_thread


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


def start(qpconn_server: Any, line: str = "greylisting") -> Any:
    recorder = sessions_plugin()
    server = qpconn_server(
        plugins=["relay", line, "rcpt_ok", "queue/maildir maildir", recorder],
        files={"relayclients": ["127.0.0.9"]},
    )
    server.extra["sessions"] = recorder
    return server


async def rcpt(server: Any, source: str, sender: str, *recipients: str) -> list[int]:
    commands = ["EHLO c.test", f"MAIL FROM:<{sender}>"] + [f"RCPT TO:<{r}>" for r in recipients]
    replies = await in_thread(script, server.address, source, commands)
    await server.wait_sessions_closed()
    assert all(r.text == "4.7.1 Greylisted, try again later" for r in replies if r.code == 450)
    return codes(replies)[3:]


def age(tmp_path: Any, seconds: float, column: str = "first_seen", db: str = "greylist.db") -> None:
    """Pretend ``seconds`` have passed since every triplet's ``column`` time."""
    with sqlite3.connect(os.path.join(tmp_path, db)) as handle:
        handle.execute(f"UPDATE greylist SET {column} = {column} - ?", (seconds,))


@pytest_twisted.ensureDeferred
async def test_first_attempt_deferred_a_patient_retry_passes(qpconn_server, tmp_path):
    server = start(qpconn_server)
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [450]
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [450]  # too soon
    age(tmp_path, 3001)
    assert await rcpt(server, "127.0.0.2", "A@Example.org", "U@mx.test") == [250]
    # white now, for the whole /24, and only for this triplet
    assert await rcpt(server, "127.0.0.3", "a@example.org", "u@mx.test", "v@mx.test") == [250, 450]
    assert await rcpt(server, "127.0.1.2", "a@example.org", "u@mx.test") == [450]
    assert await rcpt(server, "127.0.0.2", "", "u@mx.test") == [450]
    reasons = [v["reason"] for v in server.extra["sessions"].of("greylisting", 2)]
    assert reasons == ["passed: 127.0.0.0/24 <a@example.org> <u@mx.test>"]


@pytest_twisted.ensureDeferred
async def test_expiry_of_grey_and_white_entries(qpconn_server, tmp_path):
    line = "greylisting black_timeout 10 grey_timeout 100 white_timeout 1000"
    server = start(qpconn_server, line)
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [450]
    age(tmp_path, 101)  # waited too long: starts over
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [450]
    age(tmp_path, 11)
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [250]
    age(tmp_path, 999, "last_seen")
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [250]  # still white
    age(tmp_path, 1001, "last_seen")
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [450]
    verdicts = server.extra["sessions"].of("greylisting")
    assert verdicts[0]["reason"].startswith("expired: ")


@pytest_twisted.ensureDeferred
async def test_state_is_shared_through_the_file(qpconn_server, tmp_path):
    first = start(qpconn_server, "greylisting db grey.sqlite")
    assert await rcpt(first, "127.0.0.2", "a@example.org", "u@mx.test") == [450]
    age(tmp_path, 3001, db="grey.sqlite")
    second = start(qpconn_server, "greylisting db grey.sqlite")
    assert await rcpt(second, "127.0.0.2", "a@example.org", "u@mx.test") == [250]
    assert await rcpt(first, "127.0.0.2", "a@example.org", "u@mx.test") == [250]


@pytest_twisted.ensureDeferred
async def test_testonly_relay_clients_and_a_broken_database(qpconn_server, tmp_path):
    server = start(qpconn_server, "greylisting mode testonly")
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [250]
    (verdict,) = server.extra["sessions"].of("greylisting")
    assert (verdict["result"], verdict["action"]) == ("fail", "log")
    server = start(qpconn_server)
    assert await rcpt(server, "127.0.0.9", "a@example.org", "u@mx.test") == [250]
    (tmp_path / "dir.db").mkdir()
    server = start(qpconn_server, "greylisting db dir.db")
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [250]
    assert server.extra["sessions"].of("greylisting")[0]["result"] == "temperror"


def test_networks_and_arguments():
    assert triplet_network("192.0.2.77") == "192.0.2.0/24"
    assert triplet_network("2001:db8:1:2:3::4") == "2001:db8:1:2::/64"
    assert triplet_network("::ffff:192.0.2.1") == "192.0.2.0/24"
    bad = [("mode", "off"), ("black_timeout", "x"), ("black_timeout", "9", "grey_timeout", "5")]
    for args in bad:
        with pytest.raises(PluginLoadError):
            load_plugin(Config(None), "greylisting", *args)
