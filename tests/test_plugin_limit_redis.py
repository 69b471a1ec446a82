"""limit with its counters in a real Redis shared by two real qpconn servers.

Redis is stopped in the middle of a test and started again on the same port, to check the
policy while it is away (let through, or 421/451 with ``on_error tempfail``), the one
warning per outage with its metric, and the reconnection once it is back.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import redis

from qpconn.kit.limitstore import KEY_PREFIX
from tests.e2e_client import logged_events, watch_errors
from tests.support.policy import BoundClient, codes
from tests.support.redisserver import redis_binary, redis_server
from tests.support.server import in_thread
from tests.support.timing import wait_until
from tests.test_plugin_limit import MAIL, rcpts, run
from tests.test_plugin_limit import start as start  # the fixture, re-exported

pytestmark = pytest.mark.skipif(
    redis_binary() is None, reason="redis-server is not installed (apt-get install redis-server)"
)


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture
def redis_url(tmp_path: Any) -> Iterator[str]:
    with redis_server(str(tmp_path)) as url:
        yield url


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """The limit plugin's outage and recovery events."""
    with logged_events("redis_outage", "redis_recovered") as found:
        yield found


def closed_port() -> int:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return int(closed.getsockname()[1])  # nothing listens there once closed


def outages(server: Any) -> float:
    value = server.extra["metrics"].registry.get_sample_value(
        "qpconn_redis_outages_total", {"plugin": "limit"}
    )
    return value or 0.0


def limit_of(server: Any) -> Any:
    (plugin,) = [p for p in server.factory.plugins if p.name == "limit"]
    return plugin


@pytest_twisted.ensureDeferred
async def test_two_servers_share_the_counters(start, redis_url):
    line = f"limit redis {redis_url} rate_rcpt_sender 3/1h concurrency 1"
    first, second = start(line), start(line)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert codes(await run(first, "127.0.0.2", MAIL + rcpts("u@mx.test", "v@mx.test")))[3:] == [
        250, 250,
    ]  # fmt: skip
    key = KEY_PREFIX + "rate_rcpt_sender:a@example.org"
    assert client.get(key) == "2"
    assert 3_500_000 < client.pttl(key) <= 3_600_000  # the window, as the key's TTL
    replies = await run(second, "127.0.0.3", MAIL + rcpts("w@mx.test", "x@mx.test"))
    assert codes(replies)[3:] == [250, 450]  # the third on the second server, then full
    assert client.get(key) == "3"  # the refused one was not counted
    # one session open on the first server holds the address's only place on the second
    held = await in_thread(BoundClient, first.address, "127.0.0.2")
    try:
        assert held.greeting.code == 220
        assert client.zcard(KEY_PREFIX + "concurrency:127.0.0.2") == 1

        def refused() -> Any:
            with BoundClient(second.address, "127.0.0.2") as other:
                return other.greeting

        reply = await in_thread(refused)
        assert (reply.code, reply.text) == (
            421, "4.7.0 mx.test Too many connections from your address, try again later"
        )  # fmt: skip
    finally:
        held.close()
    await first.wait_sessions_closed()
    assert client.zcard(KEY_PREFIX + "concurrency:127.0.0.2") == 0  # vacated at disconnect
    assert codes(await run(second, "127.0.0.2", [])) == [220]


@pytest_twisted.ensureDeferred
async def test_the_places_of_a_dead_node_expire(start, redis_url):
    server = start(f"limit redis {redis_url} concurrency 1 concurrency_ttl 1")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    key = KEY_PREFIX + "concurrency:127.0.0.2"
    # a node that died with a session open: its place is in Redis, and nobody vacates it
    # (for 3 s: time for the session below on a loaded machine, then the place expires)
    client.zadd(key, {"dead-node-session": time.time() * 1000 + 3000})
    client.pexpire(key, 3000)
    assert codes(await run(server, "127.0.0.2", [])) == [421]
    assert await in_thread(wait_until, lambda: not client.exists(key))
    assert codes(await run(server, "127.0.0.2", [])) == [220]


@pytest_twisted.ensureDeferred
async def test_redis_down_mid_run_lets_mail_through_then_reconnects(start, events, tmp_path):
    port = closed_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start(f"limit redis {url} rate_rcpt_host 2/1m")
    three = MAIL + rcpts("u@mx.test", "v@mx.test", "w@mx.test")
    with redis_server(str(tmp_path), port=port):
        assert codes(await run(server, "127.0.0.2", three))[3:] == [250, 250, 450]
    # Redis is gone: the default policy lets every recipient through, unchecked
    assert codes(await run(server, "127.0.0.2", three))[3:] == [250, 250, 250]
    assert codes(await run(server, "127.0.0.2", three))[3:] == [250, 250, 250]
    verdicts = server.extra["sessions"].of("limit")
    assert [v["result"] for v in verdicts] == ["temperror"] * 3
    assert all(v["action"] == "accept" for v in verdicts)
    # one warning and one count for the whole outage, however many sessions it touched
    assert [e["event"] for e in events] == ["redis_outage"]
    assert "letting everything through" in events[0]["policy"]
    assert f"127.0.0.1:{port}" in events[0]["where"]
    assert outages(server) == 1
    limit_of(server).outage.hold = 0.0  # ask again at once (the default waits 5 s)
    with redis_server(str(tmp_path), port=port):  # back on its address, empty
        assert codes(await run(server, "127.0.0.2", three))[3:] == [250, 250, 450]
        assert [e["event"] for e in events] == ["redis_outage", "redis_recovered"]
    assert outages(server) == 1
    # and down again: a new outage, logged and counted again
    assert codes(await run(server, "127.0.0.2", three))[3:] == [250, 250, 250]
    assert [e["event"] for e in events][-1] == "redis_outage" and outages(server) == 2


@pytest_twisted.ensureDeferred
async def test_on_error_tempfail_gives_421_at_connect_and_451_later(start, events):
    url = f"redis://127.0.0.1:{closed_port()}/0"
    server = start(f"limit redis {url} rate_conn 5/1m on_error tempfail")
    (reply,) = await run(server, "127.0.0.2", [])
    assert (reply.code, reply.text) == (
        421, "4.3.0 mx.test Limits cannot be checked now, try again later"
    )  # fmt: skip
    server = start(f"limit redis {url} rate_rcpt_domain 5/1m on_error tempfail")
    replies = await run(server, "127.0.0.2", MAIL + rcpts("u@mx.test"))
    assert codes(replies) == [220, 250, 250, 451]
    assert replies[-1].text == "4.3.0 Limits cannot be checked now, try again later"
    assert "giving 421/451" in events[0]["policy"]


@pytest_twisted.ensureDeferred
async def test_a_hanging_redis_costs_at_most_its_timeout(start, events):
    with socket.socket() as silent:  # accepts (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        server = start(f"limit redis {url} redis_timeout 0.3 rate_rcpt_host 5/1m")
        began = time.monotonic()
        replies = await run(server, "127.0.0.2", MAIL + rcpts("u@mx.test", "v@mx.test"))
        assert codes(replies)[3:] == [250, 250]
        # one try and its retry, then held off: under half the 30 s hook timeout
        assert time.monotonic() - began < 15
    assert "imeout" in events[0]["error"] and len(events) == 1
