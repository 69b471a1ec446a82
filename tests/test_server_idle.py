"""The factory's idle timers (qpconn.server.idle): exact, freed, bounded under churn."""

from __future__ import annotations

import math
import weakref

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from qpconn.config import Config
from qpconn.server.factory import SMTPFactory
from qpconn.server.idle import IdleTimers
from qpconn.server.peerinfo import LookupSettings
from tests.support.server import write_config


class FakeSession:
    """What IdleTimers needs of a protocol: ``idle_expired``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.expired_at: list[float] = []

    def idle_expired(self) -> None:
        self.expired_at.append(self.clock.seconds())


def test_a_timer_runs_out_exactly_when_its_own_delayedcall_would_have():
    """The shared call, scheduled when an earlier timer ran out at a time where
    ``now + (due - now)`` rounds above ``due``, must still run at ``due`` exactly, as the
    session's own DelayedCall did."""
    clock = Clock()
    clock.rightNow = 0.9083428985001119
    timers = IdleTimers(clock)
    late, early = FakeSession(clock), FakeSession(clock)
    timers.arm(late, 7.0)  # type: ignore[arg-type]
    due = clock.seconds() + 7.0
    timers.arm(early, 1.076894204058417 - clock.seconds())  # type: ignore[arg-type]
    clock.advance(1.076894204058417 - clock.seconds())
    assert len(early.expired_at) == 1
    now = clock.seconds()
    assert now + (due - now) > due  # the rounding this is about
    clock.rightNow = math.nextafter(due, 0.0)
    clock.advance(0)
    assert late.expired_at == []
    clock.rightNow = due
    clock.advance(0)
    assert late.expired_at == [due]
    assert len(timers) == 0 and clock.getDelayedCalls() == []


def test_a_reset_moves_the_timer_later_and_an_earlier_period_moves_it_earlier():
    clock = Clock()
    timers = IdleTimers(clock)
    talker, quiet = FakeSession(clock), FakeSession(clock)
    entry = timers.arm(talker, 10.0)  # type: ignore[arg-type]
    timers.arm(quiet, 10.0)  # type: ignore[arg-type]
    for _ in range(5):
        clock.advance(2.5)
        entry = timers.reset(entry, 10.0)
    assert quiet.expired_at == [10.0] and talker.expired_at == []
    assert len(clock.getDelayedCalls()) == 1  # one call for every session
    entry = timers.reset(entry, 1.0)  # shorter than what is left: runs out sooner
    clock.advance(0.75)
    assert talker.expired_at == []
    clock.advance(0.25)
    assert talker.expired_at == [13.5]
    assert clock.getDelayedCalls() == []


def test_cancelled_timers_let_their_sessions_go_and_leave_nothing_behind():
    clock = Clock()
    timers = IdleTimers(clock)
    session = FakeSession(clock)
    gone = weakref.ref(session)
    entry = timers.arm(session, 300.0)  # type: ignore[arg-type]
    timers.cancel(entry)
    del session
    assert gone() is None  # freed by reference counting, no collector pass
    assert clock.getDelayedCalls() == [] and timers._heap == []


def test_dead_entries_are_compacted_under_churn():
    clock = Clock()
    timers = IdleTimers(clock)
    held = FakeSession(clock)
    timers.arm(held, 300.0)  # type: ignore[arg-type]
    for _ in range(10_000):  # sessions that come and go long before their timeout
        timers.cancel(timers.arm(FakeSession(clock), 300.0))  # type: ignore[arg-type]
    assert len(timers) == 1
    assert len(timers._heap) <= 66  # 1 live + at most the compaction floor of dead ones
    clock.advance(300.0)
    assert held.expired_at == [300.0] and clock.getDelayedCalls() == []


def test_sessions_idle_timers_run_on_the_factory_clock(tmp_path):
    """Without ``proto.callLater`` set, the idle timeout follows the factory's clock: 421
    at exactly ``timeout`` seconds of silence, the abort ``timeout`` after that."""
    config = Config(write_config(str(tmp_path / "c"), {"me": "mx.test", "timeout": "7"}))
    clock = Clock()
    factory = SMTPFactory(config, [], clock=clock, lookups=LookupSettings(rdns=False))
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40001),
    )
    protocol = factory.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    clock.advance(5.0)
    protocol.dataReceived(b"EHLO client.test\r\n")  # the timer starts over
    transport.clear()
    clock.advance(6.75)
    assert transport.value() == b""
    clock.advance(0.25)
    assert transport.value() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    assert len(factory.idle_timers) == 1  # the next one: the client does not go away
    protocol.connectionLost(None)
    assert len(factory.idle_timers) == 0 and clock.getDelayedCalls() == []
    assert factory.idle_timers._heap == []  # nothing there holds the session any more


def test_a_reload_keeps_the_timers_of_the_sessions_in_flight(tmp_path):
    """The heap holds the open sessions' timers: a reload (SIGHUP) must not replace it,
    or their timers would be moved and cancelled in a heap that does not hold them."""
    from qpconn.app.reload import reload_factory

    config = Config(write_config(str(tmp_path / "c"), {"me": "mx.test", "timeout": "7"}))
    clock = Clock()
    factory = SMTPFactory(config, [], clock=clock, lookups=LookupSettings(rdns=False))
    timers = factory.idle_timers
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40002),
    )
    protocol = factory.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    assert reload_factory(factory)
    assert factory.idle_timers is timers and len(timers) == 1
    transport.clear()
    clock.advance(7.0)
    assert transport.value() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    protocol.connectionLost(None)
    assert len(timers) == 0 and clock.getDelayedCalls() == []
