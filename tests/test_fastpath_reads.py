"""Socket events dispatched without Twisted's per-event call layers (fastpath.reads).

A listening SMTPFactory gives the running epoll reactor a ``doIteration`` that does what
``log.callWithLogger`` around ``_doReadOrWrite`` does, in one frame. What must not change:
a legacy log line made during a read is tagged with the connection's log prefix, exactly as
under Twisted's own dispatch (compared on the same server, with and without it); an
exception that escapes is logged with that prefix and the context stack is left as it
was; a buggy ``logPrefix`` is reported as Twisted reports it. Anything but Twisted's own
epoll reactor keeps Twisted's dispatch.
"""

from __future__ import annotations

import errno
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python import context, log

from qpconn.hooks.results import DECLINED
from qpconn.plugins import Plugin
from qpconn.server.fastpath import reads
from tests.e2e_client import watch_errors
from tests.support.server import in_thread

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # pragma: no cover - not Linux
    EPollReactor = None  # type: ignore[assignment,misc]

epoll_only = pytest.mark.skipif(
    EPollReactor is None or not isinstance(reactor, EPollReactor),
    reason="the test reactor is not Twisted's epoll reactor (no epoll on this platform)",
)


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


class LegacyLogLine(Plugin):
    """Writes a legacy log.msg line from inside a read (the mail hook runs in dataReceived)."""

    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        log.msg("legacy line from hook_mail")
        return DECLINED


def _send_one(address: tuple[str, int]) -> None:
    with smtplib.SMTP(*address, timeout=10) as smtp:
        smtp.sendmail("a@example.org", ["u@mx.test"], b"Subject: t\r\n\r\nbody\r\n")


async def _system_of_legacy_line(server: Any) -> str:
    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_text") == "legacy line from hook_mail" or (
            event.get("message") == ("legacy line from hook_mail",)
        ):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        await in_thread(_send_one, server.address)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert len(seen) == 1, seen
    return seen[0]["log_system"]


@epoll_only
@pytest_twisted.ensureDeferred
async def test_a_listening_server_reads_through_the_direct_dispatch(qpconn_server):
    server = qpconn_server()
    assert reads.installed(reactor)
    await in_thread(_send_one, server.address)
    assert len(server.messages()) == 1


@epoll_only
@pytest_twisted.ensureDeferred
async def test_a_legacy_log_line_made_in_a_read_has_the_prefix_twisted_gives_it(qpconn_server):
    server = qpconn_server(plugins=[LegacyLogLine, "rcpt_ok", "queue/discard"])
    assert reads.installed(reactor)
    direct = await _system_of_legacy_line(server)
    reads.uninstall(reactor)
    try:
        assert not reads.installed(reactor)
        twisted_own = await _system_of_legacy_line(server)
    finally:
        assert reads.install(reactor)
    assert direct.startswith("SMTPServerProtocol,")
    assert direct.endswith(",127.0.0.1")
    # the session numbers differ (two connections); the shape is Twisted's own
    assert direct.rsplit(",", 2)[0::2] == twisted_own.rsplit(",", 2)[0::2]


# -- the dispatch itself, on a reactor stand-in ------------------------------------------------
class _Selectable:
    def __init__(self, prefix: str | None) -> None:
        self.prefix = prefix

    def logPrefix(self) -> str:
        if self.prefix is None:
            raise RuntimeError("a broken logPrefix")
        return self.prefix


class _Poller:
    def __init__(self, events: list[tuple[int, int]], error: OSError | None = None) -> None:
        self.events = events
        self.error = error
        self.asked: list[tuple[float, int]] = []

    def poll(self, timeout: float, most: int) -> list[tuple[int, int]]:
        self.asked.append((timeout, most))
        if self.error is not None:
            raise self.error
        return self.events


class _Reactor:
    def __init__(self, selectables: dict[int, Any], poller: _Poller, fail: bool = False) -> None:
        self._selectables = selectables
        self._poller = poller
        self.fail = fail
        self.calls: list[tuple[Any, int, int, str | None]] = []

    def _doReadOrWrite(self, selectable: Any, fd: int, event: int) -> None:
        self.calls.append((selectable, fd, event, context.get(log.ILogContext)["system"]))
        if self.fail:
            raise ValueError("escaped from _doReadOrWrite")


def test_each_event_runs_with_its_prefix_as_the_log_system_and_the_stack_is_restored():
    one, two = _Selectable("Proto,1,127.0.0.1"), _Selectable("Proto,2,127.0.0.1")
    fake = _Reactor({3: one, 4: two}, _Poller([(3, 1), (9, 1), (4, 4)]))
    depth = len(context.theContextTracker.currentContext().contexts)
    reads._direct_poll(fake)(None)
    assert fake._poller.asked == [(-1, 2)]  # None waits; at most one event per selectable
    # fd 9 is not registered (removed by an earlier event): skipped, as Twisted does
    assert fake.calls == [(one, 3, 1, "Proto,1,127.0.0.1"), (two, 4, 4, "Proto,2,127.0.0.1")]
    assert len(context.theContextTracker.currentContext().contexts) == depth


def test_an_escaping_exception_is_logged_with_the_prefix_after_the_context_is_popped(errors):
    fake = _Reactor({3: _Selectable("Proto,7,127.0.0.1")}, _Poller([(3, 1)]), fail=True)
    depth = len(context.theContextTracker.currentContext().contexts)
    reads._direct_poll(fake)(0.5)
    assert fake._poller.asked == [(0.5, 1)]
    assert len(context.theContextTracker.currentContext().contexts) == depth
    assert len(errors) == 1
    assert errors[0]["log_system"] == "Proto,7,127.0.0.1"
    assert errors[0]["failure"].check(ValueError)
    errors.clear()


def test_a_buggy_log_prefix_is_reported_and_the_event_still_handled(errors):
    broken = _Selectable(None)
    fake = _Reactor({3: broken}, _Poller([(3, 1)]))
    reads._direct_poll(fake)(0)
    assert fake.calls == [(broken, 3, 1, "(buggy logPrefix method)")]
    assert [e["log_system"] for e in errors] == ["(buggy logPrefix method)"]
    errors.clear()


def test_an_interrupted_poll_returns_and_other_poll_errors_propagate():
    fake = _Reactor({}, _Poller([], OSError(errno.EINTR, "interrupted")))
    reads._direct_poll(fake)(1.0)  # EINTR: just the next iteration
    fake = _Reactor({}, _Poller([], OSError(errno.EBADF, "bad descriptor")))
    with pytest.raises(OSError):
        reads._direct_poll(fake)(1.0)


# -- the fallback -----------------------------------------------------------------------------
def test_a_clock_is_left_alone():
    clock = Clock()
    assert not reads.install(clock)
    assert not reads.installed(clock)


@pytest.mark.skipif(EPollReactor is None, reason="no epoll on this platform")
def test_a_reactor_that_polls_its_own_way_keeps_it():
    class OwnPoll(EPollReactor):  # type: ignore[misc,valid-type]
        def doPoll(self, timeout: float | None) -> None:
            pass

    own = OwnPoll.__new__(OwnPoll)  # never initialised: install must not touch it
    assert not reads.install(own)
    assert "doIteration" not in own.__dict__


@epoll_only
def test_a_replaced_do_iteration_is_not_replaced_again():
    was = reactor.__dict__.get("doIteration")
    reads.uninstall(reactor)
    reactor.doIteration = lambda timeout: None  # someone else's
    try:
        assert not reads.install(reactor)
    finally:
        del reactor.doIteration
        if was is not None:
            assert reads.install(reactor)
