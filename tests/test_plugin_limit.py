"""limit with its counters in this process: a real qpconn, real SMTP clients on loopback.

The Redis-backed counters (shared by two servers, Redis going away and coming back) are in
tests/test_plugin_limit_redis.py; the rules are the same, so these tests are its baseline.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from qpconn import OK
from qpconn.app.metrics import ServerMetrics
from qpconn.config import Config
from qpconn.kit.limitstore import MemoryLimits, Rate
from qpconn.plugins import Plugin, PluginLoadError, load_plugin
from tests.e2e_client import watch_errors
from tests.support.policy import BoundClient, codes, script, sessions_plugin
from tests.support.server import in_thread

MAIL = ["EHLO c.test", "MAIL FROM:<a@example.org>"]


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


class AnyUser(Plugin):
    """Accepts every AUTH: the user limit needs authenticated sessions, not passwords."""

    def hook_auth(self, transaction: Any, *args: Any) -> Any:
        return OK


@pytest.fixture
def start(qpconn_server: Any) -> Iterator[Any]:
    """``start(line, *extra_plugins)``: a server with ``limit`` before ``rcpt_ok``, whose
    verdicts (``extra["sessions"]``) and metrics (``extra["metrics"]``) the test reads."""
    attached: list[ServerMetrics] = []

    def start(line: str, *extra: Any) -> Any:
        recorder = sessions_plugin()
        server = qpconn_server(
            plugins=["relay", line, *extra, "rcpt_ok", "queue/maildir maildir", recorder],
            files={"relayclients": ["127.0.0.9"], "tls_before_auth": "0"},
        )
        server.extra["sessions"] = recorder
        server.extra["metrics"] = ServerMetrics(server.factory).attach()
        attached.append(server.extra["metrics"])
        return server

    yield start
    for metrics in attached:
        metrics.detach()


def refusals(server: Any, limit: str) -> float:
    value = server.extra["metrics"].registry.get_sample_value(
        "qpconn_limit_refusals_total", {"limit": limit}
    )
    return value or 0.0


async def run(server: Any, source: str, commands: list[Any]) -> list[Any]:
    replies = await in_thread(script, server.address, source, commands)
    await server.wait_sessions_closed()
    return replies


def rcpts(*recipients: str) -> list[str]:
    return [f"RCPT TO:<{r}>" for r in recipients]


@pytest_twisted.ensureDeferred
async def test_connection_rate_per_address(start):
    server = start("limit rate_conn 2/1m")
    assert codes(await run(server, "127.0.0.2", [])) == [220]
    assert codes(await run(server, "127.0.0.2", [])) == [220]
    (refused,) = await run(server, "127.0.0.2", ["EHLO c.test"])
    assert (refused.code, refused.text) == (
        421, "4.7.0 mx.test Too many connections from your address in a short time, try again later"
    )  # fmt: skip
    assert codes(await run(server, "127.0.0.3", [])) == [220]  # another address
    for _ in range(3):  # a relay client is exempt
        assert codes(await run(server, "127.0.0.9", [])) == [220]
    assert refusals(server, "rate_conn") == 1
    (verdict,) = server.extra["sessions"].of("limit", 2)
    assert (verdict["result"], verdict["reason"]) == ("fail", "rate_conn 127.0.0.2")


@pytest_twisted.ensureDeferred
async def test_concurrent_sessions_per_address(start):
    server = start("limit concurrency 1")
    first = await in_thread(BoundClient, server.address, "127.0.0.2")
    try:
        assert first.greeting.code == 220

        def others() -> list[int]:
            with BoundClient(server.address, "127.0.0.2") as second:
                refused = second.greeting
            with BoundClient(server.address, "127.0.0.3") as third:
                return [refused.code, third.greeting.code]

        assert await in_thread(others) == [421, 220]
    finally:
        first.close()
    await server.wait_sessions_closed()
    # the place is given back at disconnect
    assert codes(await run(server, "127.0.0.2", [])) == [220]
    assert refusals(server, "concurrency") == 1


@pytest_twisted.ensureDeferred
async def test_recipients_per_address_sender_and_domain(start):
    server = start("limit rate_rcpt_host 3/1m")
    replies = await run(server, "127.0.0.2", MAIL + rcpts("u@mx.test", "v@mx.test", "w@mx.test",
                                                           "x@mx.test"))  # fmt: skip
    assert codes(replies)[3:] == [250, 250, 250, 450]
    assert replies[-1].text == (
        "4.7.1 Too many recipients from your address in a short time, try again later"
    )
    assert codes(await run(server, "127.0.0.2", MAIL + rcpts("u@mx.test")))[-1] == 450
    assert codes(await run(server, "127.0.0.3", MAIL + rcpts("u@mx.test")))[-1] == 250

    server = start("limit rate_rcpt_sender 2/1h rate_rcpt_domain 3/1h")
    one = ["EHLO c.test", "MAIL FROM:<One@Example.org>", *rcpts("u@mx.test", "v@mx.test")]
    assert codes(await run(server, "127.0.0.2", one))[3:] == [250, 250]
    # the same sender (compared without case) from another address: its count goes on
    replies = await run(server, "127.0.0.3", ["EHLO c", "MAIL FROM:<one@example.org>",
                                              *rcpts("w@mx.test")])  # fmt: skip
    assert replies[-1].text.startswith("4.7.1 Too many recipients from this sender ")
    # another sender of the domain: the domain's count (2 so far) allows one more
    two = ["EHLO c.test", "MAIL FROM:<two@example.org>", *rcpts("u@mx.test", "v@mx.test")]
    replies = await run(server, "127.0.0.4", two)
    assert codes(replies)[3:] == [250, 450]
    assert replies[-1].text.startswith("4.7.1 Too many recipients from this sender's domain ")
    assert refusals(server, "rate_rcpt_sender") == refusals(server, "rate_rcpt_domain") == 1
    # a refused recipient is not counted: the other sender of another domain is unaffected
    other = ["EHLO c.test", "MAIL FROM:<a@other.example>", *rcpts("u@mx.test")]
    assert codes(await run(server, "127.0.0.4", other))[-1] == 250


@pytest_twisted.ensureDeferred
async def test_messages_per_authenticated_user(start):
    server = start("limit rate_msg_user 2/1h", AnyUser(Config(None), "anyuser"))

    def login(user: str) -> str:
        return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0pw".encode()).decode()

    session = ["EHLO c.test", login("alice")] + ["MAIL FROM:<a@example.org>", "RSET"] * 3
    replies = await run(server, "127.0.0.2", session)
    assert codes(replies) == [220, 250, 235, 250, 250, 250, 250, 450, 250]
    assert replies[7].text == "4.7.1 Too many messages from you in a short time, try again later"
    # another user is counted apart; a session without AUTH is not counted at all
    replies = await run(server, "127.0.0.2", ["EHLO c.test", login("bob"), MAIL[1]])
    assert codes(replies)[-1] == 250
    assert codes(await run(server, "127.0.0.2", MAIL + ["RSET", MAIL[1]] * 3))[-1] == 250
    assert refusals(server, "rate_msg_user") == 1


@pytest_twisted.ensureDeferred
async def test_unrecognized_commands_and_errors_per_session(start):
    server = start("limit unrecognized_commands 3")
    replies = await run(server, "127.0.0.2", ["EHLO c.test", "XYZZY", "FOO", "BAR", "NOOP"])
    assert codes(replies) == [220, 250, 500, 500, 421]
    assert replies[-1].text == "4.7.0 Too many unrecognized commands, closing connection"

    server = start("limit errors 2")
    # two refused recipients (rcpt_ok: relaying denied) and the next command is refused
    commands = MAIL + rcpts("x@elsewhere.example", "y@elsewhere.example", "u@mx.test")
    replies = await run(server, "127.0.0.2", commands)
    assert codes(replies) == [220, 250, 250, 550, 550, 421]
    assert replies[-1].text == "4.7.0 Too many errors, closing connection"
    # an unrecognized command counts as an error, once
    replies = await run(server, "127.0.0.2", ["EHLO c.test", "FOO", "BAR", "NOOP"])
    assert codes(replies) == [220, 250, 500, 500, 421]
    assert refusals(server, "errors") == 2


def test_memory_windows_end_and_refusals_are_not_counted():
    store = MemoryLimits()
    rate = Rate.parse("2/10s")
    counters = [("a", rate), ("b", Rate.parse("5/1m"))]
    assert [store.take(counters, 100.0) for _ in range(3)] == [None, None, 0]
    assert (store.used("a"), store.used("b")) == (2, 2)  # the refused event was not counted
    assert store.take(counters, 110.0) is None  # the window of "a" is over
    assert (store.used("a"), store.used("b")) == (1, 3)


def test_the_documented_lines_load():
    text = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text("utf-8")
    lines = [line for line in text.splitlines()
             if line.startswith(("limit redis ", "karma redis "))]  # fmt: skip
    assert len(lines) == 2
    for line in lines:
        name, *args = line.split()
        assert load_plugin(Config(None), name, *args).name == name


def test_arguments():
    assert Rate.parse("30/1m") == Rate(30, 60.0) and Rate.parse("5/90") == Rate(5, 90.0)
    bad = [(), ("rate_conn", "30"), ("rate_conn", "0/1m"), ("concurrency", "-1"),
           ("errors", "x"), ("redis", "http://127.0.0.1/", "errors", "1"),
           ("concurrency", "1", "concurrency_ttl", "0"), ("errors", "1", "on_error", "maybe"),
           ("rate_rcpt_host", "1/8d")]  # fmt: skip
    for args in bad:
        with pytest.raises(PluginLoadError):
            load_plugin(Config(None), "limit", *args)
