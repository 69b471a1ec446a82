"""karma with its history in a real Redis shared by two real qpconn servers."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import redis

from qpconn.config import Config
from qpconn.kit.karmaredis import KEY_PREFIX
from qpconn.plugins import PluginLoadError, load_plugin
from tests.e2e_client import logged_events, watch_errors
from tests.support.policy import codes
from tests.support.redisserver import redis_binary, redis_server
from tests.test_plugin_karma import BAD, good, run, start

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
    with logged_events("redis_outage", "redis_recovered") as found:
        yield found


@pytest_twisted.ensureDeferred
async def test_a_bad_client_is_kept_out_of_every_server(qpconn_server, redis_url, tmp_path):
    line = f"karma redis {redis_url}"
    first, second = start(qpconn_server, line), start(qpconn_server, line)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert codes(await run(first, "127.0.0.2", BAD)) == [220, 250, 250, 550, 550, 550]
    key = KEY_PREFIX + "127.0.0.2"
    history = client.hgetall(key)
    assert (history["good"], history["bad"], history["connections"]) == ("0", "3", "1")
    assert float(history["last_bad"]) > 0
    assert 59 * 86400_000 < client.pttl(key) <= 60 * 86400_000  # expire_days 60
    # the second server never saw the client, and refuses it
    replies = await run(second, "127.0.0.2", ["EHLO c.test"])
    assert codes(replies) == [450]
    assert "(karma -3)" in replies[0].text
    # good points count wherever they are earned
    assert codes(await good(second, "127.0.0.3"))[-1] == 250
    assert codes(await good(first, "127.0.0.3"))[-1] == 250
    assert client.hmget(KEY_PREFIX + "127.0.0.3", ["good", "connections"]) == ["2", "2"]
    (verdict,) = first.extra["sessions"].of("karma")
    assert verdict["reason"] == "karma 1"  # what the second server had added
    assert not (tmp_path / "karma.db").exists()  # nothing went to the SQLite file


@pytest_twisted.ensureDeferred
async def test_redis_down_judges_nobody_until_it_is_back(qpconn_server, events, tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    server = start(qpconn_server, f"karma redis redis://127.0.0.1:{port}/0 expire_days 1")
    with redis_server(str(tmp_path), port=port):
        await run(server, "127.0.0.2", BAD)
        assert codes(await run(server, "127.0.0.2", [])) == [450]
    # Redis is gone: the client is not judged, its new bad points are not kept
    assert codes(await run(server, "127.0.0.2", BAD)) == [220, 250, 250, 550, 550, 550]
    assert codes(await run(server, "127.0.0.2", [])) == [220]
    assert server.extra["sessions"].of("karma")[0]["result"] == "temperror"
    assert [e["event"] for e in events] == ["redis_outage"]  # once for the whole outage
    (plugin,) = [p for p in server.factory.plugins if p.name == "karma"]
    plugin.outage.hold = 0.0
    with redis_server(str(tmp_path), port=port):  # back, empty: history starts again
        assert codes(await run(server, "127.0.0.2", BAD))[-1] == 550
        assert codes(await run(server, "127.0.0.2", [])) == [450]
        client = redis.Redis(port=port, decode_responses=True)
        assert 0 < client.pttl(KEY_PREFIX + "127.0.0.2") <= 86400_000
    assert [e["event"] for e in events] == ["redis_outage", "redis_recovered"]


def test_redis_arguments():
    for args in [("redis", "http://127.0.0.1/"), ("redis", "redis://127.0.0.1/0",
                                                   "redis_timeout", "0"),
                 ("redis", "redis://127.0.0.1/0", "expire_days", "0")]:  # fmt: skip
        with pytest.raises(PluginLoadError):
            load_plugin(Config(None), "karma", *args)
