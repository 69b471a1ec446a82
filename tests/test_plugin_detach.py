"""Plugins let go of what they hold: after a reload replaced them, and at shutdown.

The whole path with a real server and a real next hop is in tests/test_ops_reload.py;
here the bookkeeping of :mod:`qpconn.server.retire` (a set waits for its last session, a
failing or hanging ``detach`` is logged and does not stop the others) and a real Redis
whose client connections go away when the ``limit`` plugin is detached.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from qpconn.config import Config
from qpconn.hooks.plugin import Plugin
from qpconn.plugins.limit import Limit
from qpconn.server.retire import DETACH_TIMEOUT, RetiredPlugins
from tests.e2e_client import logged_events
from tests.support.redisserver import redis_binary, redis_server
from tests.support.timing import wait_until


class Holder(Plugin):
    """Counts its detaches; ``result`` is what detach returns (or raises)."""

    def __init__(self, name: str, result: Any = None) -> None:
        super().__init__(Config(), name)
        self.result = result
        self.detached = 0

    def detach(self) -> Any:
        self.detached += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.fixture
def events():
    with logged_events("plugin_detach") as seen:
        yield seen


def test_a_set_waits_for_the_last_session_that_started_with_it():
    retired = RetiredPlugins(Clock())
    first, second = Holder("first"), Holder("second")
    retired.retire([first], sessions=["a", "b"])
    retired.retire([second], sessions=["b"])
    retired.session_ended("b")
    assert (first.detached, second.detached) == (0, 1)
    retired.session_ended("c")  # a session that started after the reload: not counted
    assert first.detached == 0
    retired.session_ended("a")
    assert first.detached == 1 and retired.waiting == []
    retired.session_ended("a")
    assert first.detached == 1  # once only


def test_a_set_no_session_uses_is_detached_at_once():
    plugin = Holder("idle")
    RetiredPlugins(Clock()).retire([plugin], sessions=[])
    assert plugin.detached == 1


def test_a_failing_or_hanging_detach_is_logged_and_the_others_still_run(events):
    clock = Clock()
    hanging = defer.Deferred()
    broken, stuck = Holder("broken", ValueError("boom")), Holder("stuck", hanging)
    good = Holder("good")
    finished = RetiredPlugins(clock).detach_all([broken, stuck, good])
    assert (broken.detached, stuck.detached, good.detached) == (1, 1, 1)
    assert not finished.called  # waits for the slow one...
    clock.advance(DETACH_TIMEOUT + 1)
    assert finished.called  # ...but not for ever
    failed = {e["plugin"]: str(e["error"]) for e in events if e.get("result") == "detach_failed"}
    assert failed["broken"] == "boom" and "stuck" in failed and "good" not in failed


def test_shutdown_detaches_the_waiting_sets_and_the_running_one():
    retired = RetiredPlugins(Clock())
    old, running = Holder("old"), Holder("running")
    retired.retire([old], sessions=["still open"])
    done = retired.detach_all([running])
    assert done.called and (old.detached, running.detached) == (1, 1)
    retired.session_ended("still open")
    assert old.detached == 1


@pytest.mark.skipif(redis_binary() is None, reason="redis-server is not installed")
def test_the_limit_plugin_closes_its_redis_connections_when_detached(tmp_path):
    import redis

    with redis_server(str(tmp_path)) as url:
        admin = redis.Redis.from_url(url)
        plugin = Limit(Config(), "limit", "redis", url, "rate_conn", "10/60")
        plugin.store.occupy("probe", "m", 5, 60.0, 0.0)  # opens the plugin's connection
        # the admin's own connection and the plugin's
        assert wait_until(lambda: len(admin.client_list()) == 2, timeout=10)
        plugin.detach()
        assert wait_until(lambda: len(admin.client_list()) == 1, timeout=10)
        admin.close()
