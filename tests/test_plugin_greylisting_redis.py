"""greylisting with its triplets in a real Redis shared by two real qpconn servers.

The hours a sender's queue waits are simulated by moving the recorded times back in
Redis; the expiry of keys (Redis TTLs) is real, with timeouts of one second.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import redis
from twisted.logger import LogLevel, globalLogPublisher

from qpconn.config import Config
from qpconn.kit.greyredis import KEY_PREFIX
from qpconn.plugins import PluginLoadError, load_plugin
from tests.e2e_client import watch_errors
from tests.support.redisserver import redis_binary, redis_server
from tests.support.server import in_thread
from tests.support.timing import wait_until
from tests.test_plugin_greylisting import rcpt, start

KEY = KEY_PREFIX + "127.0.0.0/24 <a@example.org> <u@mx.test>"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture
def redis_url(tmp_path: Any) -> Iterator[str]:
    if redis_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with redis_server(str(tmp_path)) as url:
        yield url


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    found: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        text = str(event.get("log_format"))
        if event.get("log_level") == LogLevel.warn and text.startswith("greylisting"):
            found.append(str(event.get("error")))

    globalLogPublisher.addObserver(observer)
    yield found
    globalLogPublisher.removeObserver(observer)


def age(client: redis.Redis, seconds: float, field: str = "first") -> None:
    """Pretend ``seconds`` have passed since every triplet's ``field`` time."""
    for key in client.scan_iter(match=KEY_PREFIX + "*", count=100):
        client.hincrbyfloat(key, field, -seconds)


@pytest_twisted.ensureDeferred
async def test_two_servers_share_the_triplets(qpconn_server, redis_url):
    line = f"greylisting redis {redis_url}"
    first, second = start(qpconn_server, line), start(qpconn_server, line)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert await rcpt(first, "127.0.0.2", "a@example.org", "u@mx.test") == [450]
    assert await rcpt(second, "127.0.0.3", "a@example.org", "u@mx.test") == [450]  # too soon
    assert client.hget(KEY, "attempts") == "2"
    assert 11_000_000 < client.pttl(KEY) <= 12_000_000  # the grey period, as a TTL
    age(client, 3001)
    assert await rcpt(second, "127.0.0.2", "A@Example.org", "U@mx.test") == [250]
    assert 3_000_000_000 < client.pttl(KEY) <= 3_110_400_000  # white: white_timeout
    assert await rcpt(first, "127.0.0.4", "a@example.org", "u@mx.test", "v@mx.test") == [250, 450]
    assert await rcpt(first, "127.0.1.2", "a@example.org", "u@mx.test") == [450]
    (passed,) = second.extra["sessions"].of("greylisting", 1)
    assert passed["reason"] == "passed: 127.0.0.0/24 <a@example.org> <u@mx.test>"
    assert first.extra["sessions"].of("greylisting", 1)[0]["reason"].startswith("white: ")
    # the grey and white expiry rules hold for Redis as for SQLite
    age(client, 3_110_401, "last")
    assert await rcpt(first, "127.0.0.2", "a@example.org", "u@mx.test") == [450]
    assert first.extra["sessions"].of("greylisting")[-1]["reason"].startswith("expired: ")


@pytest_twisted.ensureDeferred
async def test_redis_forgets_triplets_by_their_ttl(qpconn_server, redis_url):
    # grey for a minute (the retry comes long before, however slow the machine), white for
    # a second (then the test waits for Redis to forget it)
    line = f"greylisting redis {redis_url} black_timeout 0 grey_timeout 60 white_timeout 1"
    server = start(qpconn_server, line)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [450]
    assert 1000 < client.pttl(KEY) <= 60_000
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [250]
    assert client.hget(KEY, "white") == "1"
    assert 0 < client.pttl(KEY) <= 1000
    assert await in_thread(wait_until, lambda: not client.exists(KEY))
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [450]
    assert server.extra["sessions"].of("greylisting")[-1]["reason"].startswith("new: ")


@pytest_twisted.ensureDeferred
async def test_redis_down_lets_mail_through_until_it_is_back(qpconn_server, warnings, tmp_path):
    if redis_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = closed.getsockname()[1]  # nothing listens there once closed
    server = start(qpconn_server, f"greylisting redis redis://127.0.0.1:{down}/0")
    assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test", "v@mx.test") == [250, 250]
    verdicts = server.extra["sessions"].of("greylisting")
    assert [v["result"] for v in verdicts] == ["temperror", "temperror"]
    assert len(warnings) == 2 and "onnect" in warnings[0]
    assert "not asked" in warnings[1]  # held off after the failure, not waited for again
    (store,) = [p.store for p in server.factory.plugins if p.name == "greylisting"]
    store.hold = 0.0
    with redis_server(str(tmp_path), port=down):  # Redis comes back on its address
        assert await rcpt(server, "127.0.0.2", "a@example.org", "u@mx.test") == [450]
    assert server.extra["sessions"].of("greylisting")[0]["reason"].startswith("new: ")


@pytest_twisted.ensureDeferred
async def test_a_hanging_redis_costs_at_most_its_timeout(qpconn_server, warnings):
    with socket.socket() as silent:  # accepts (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        line = f"greylisting redis redis://127.0.0.1:{port}/0 redis_timeout 0.3"
        server = start(qpconn_server, line)
        began = time.monotonic()
        recipients = ("u@mx.test", "v@mx.test", "w@mx.test")
        assert await rcpt(server, "127.0.0.2", "a@example.org", *recipients) == [250] * 3
        # one retry, then Redis is not asked for the next recipients (the warnings below
        # say so): 2 x 0.3 s in all, far below half the 30 s hook timeout
        assert time.monotonic() - began < 15
    verdicts = server.extra["sessions"].of("greylisting")
    assert [v["result"] for v in verdicts] == ["temperror"] * 3
    assert "imeout" in warnings[0] and all("not asked" in w for w in warnings[1:3])


def test_redis_arguments():
    for args in [("redis", "http://127.0.0.1/"), ("redis", "redis://127.0.0.1/0",
                                                   "redis_timeout", "0")]:
        with pytest.raises(PluginLoadError):
            load_plugin(Config(None), "greylisting", *args)
