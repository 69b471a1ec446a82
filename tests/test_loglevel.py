"""The ``loglevel`` setting: qpconn's events below it are never published.

The server is built by ``make_service`` from a config directory, as ``twistd qpconn``
builds it, and its factory listens on a loopback port; a real smtplib session runs
through it while an observer on the global log publisher records what was emitted.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import LogLevel, globalLogPublisher

from qpconn.app.service import make_service
from qpconn.hooks.results import DECLINED
from qpconn.log.level import LevelLogger, current_level, parse_level, set_level
from qpconn.plugins import Plugin
from qpconn.server.peerinfo import LookupSettings
from tests.support.server import in_thread, write_config


class Chatty(Plugin):
    """Logs once at each level for every recipient, then lets the next plugin decide."""

    def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> Any:
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn):
            self.log.emit(level, "chatty {level_name}", level_name=level.name)
        return DECLINED


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """qpconn's log events while the test runs; the process threshold is reset after."""
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        # Twisted's own "Starting factory" lines carry the factory class's namespace.
        if str(event.get("log_format", "")).startswith(("Starting factory", "Stopping factory")):
            return
        if str(event.get("log_namespace", "")).startswith("qpconn."):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)
    set_level(LogLevel.debug)


def send(address: tuple[str, int]) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(*address, timeout=5) as smtp:
        return smtp.sendmail("a@example.org", ["user@mx.test"], b"Subject: x\r\n\r\nbody\r\n")


PLUGINS = "tests.test_loglevel:Chatty\nrcpt_ok\nqueue/discard\n"


async def one_message(tmp_path: Any, level: str | None) -> None:
    files = {"me": "mx.test", "rcpthosts": "mx.test\n", "plugins": PLUGINS}
    if level is not None:
        files["loglevel"] = f"{level}\n"
    config_dir = write_config(str(tmp_path / f"config-{level}"), files)
    top = make_service(
        ["tcp:0:interface=127.0.0.1"], config_dir, lookups=LookupSettings(rdns=False)
    )
    port = reactor.listenTCP(0, top.factory, interface="127.0.0.1")
    try:
        assert await in_thread(send, ("127.0.0.1", port.getHost().port)) == {}
    finally:
        await port.stopListening()


def by_level(events: list[dict[str, Any]]) -> dict[LogLevel, list[str]]:
    found: dict[LogLevel, list[str]] = {}
    for event in events:
        found.setdefault(event["log_level"], []).append(event["log_namespace"])
    return found


@pytest_twisted.ensureDeferred
async def test_default_emits_the_per_hook_debug_lines(tmp_path, events):
    await one_message(tmp_path, None)
    assert current_level() is LogLevel.debug
    levels = by_level(events)
    assert levels[LogLevel.debug] == ["qpconn.plugin.tests.test_loglevel:Chatty"]
    assert "qpconn.plugin.tests.test_loglevel:Chatty" in levels[LogLevel.info]
    assert any(e.get("event") == "transaction" for e in events)


@pytest_twisted.ensureDeferred
async def test_info_drops_debug_lines_and_keeps_the_transaction_line(tmp_path, events):
    await one_message(tmp_path, "INFO")
    assert current_level() is LogLevel.info
    levels = by_level(events)
    assert LogLevel.debug not in levels
    assert "qpconn.plugin.tests.test_loglevel:Chatty" in levels[LogLevel.info]
    assert any(e.get("event") == "transaction" for e in events)


@pytest_twisted.ensureDeferred
async def test_warn_and_error_drop_info_lines_too(tmp_path, events):
    await one_message(tmp_path, "warn")
    assert set(by_level(events)) == {LogLevel.warn}
    await one_message(tmp_path, "error")
    assert [e for e in events if e["log_level"] is not LogLevel.warn] == []


def test_an_unknown_level_is_refused_when_the_service_is_built(tmp_path, events):
    config_dir = write_config(str(tmp_path / "config"), {"loglevel": "chatty\n"})
    with pytest.raises(ValueError, match="loglevel: 'chatty' is not one of"):
        make_service(["tcp:0:interface=127.0.0.1"], config_dir)
    with pytest.raises(ValueError):
        parse_level("7")


def test_an_event_handed_over_as_a_dict_keeps_the_threshold(events):
    log = LevelLogger(namespace="qpconn.test")
    fields = {"conn_id": "c1", "n": 1}
    set_level(LogLevel.warn)
    try:
        log.emit_fields(LogLevel.info, "{conn_id} below the threshold", {"conn_id": "c0"})
        log.emit_fields(LogLevel.error, "{conn_id} {n}", fields)
    finally:
        set_level(LogLevel.debug)
    assert [event["log_format"] for event in events] == ["{conn_id} {n}"]
    (event,) = events
    assert event is fields  # the dict itself is the event: not copied
    assert event["log_level"] is LogLevel.error and event["log_namespace"] == "qpconn.test"
