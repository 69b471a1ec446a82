"""One client's long pipelined burst does not hold the other sessions (qpconn.server.protocol).

A pass over buffered input stops after ``PIPELINE_STEP`` commands: their replies go out and
the rest of the burst is parsed in the next reactor turn, so that a client sending
thousands of commands in one write (a non-reader's NOOPs, say) is served a step at a time,
between the other sessions' reads, instead of for its whole length at once. Driven in
process on a fake clock, so that "the next reactor turn" is a ``clock.advance(0)``.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from qpconn.config import Config
from qpconn.server.factory import SMTPFactory
from qpconn.server.peerinfo import LookupSettings
from qpconn.server.protocol import PIPELINE_STEP


def open_session(factory: SMTPFactory, port: int) -> tuple[object, StringTransport]:
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
        peerAddress=IPv4Address("TCP", "127.0.0.1", port),
    )
    protocol = factory.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    protocol.dataReceived(b"EHLO client.test\r\n")
    assert b"250 " in transport.value()
    transport.clear()
    return protocol, transport


def test_a_long_burst_is_answered_a_step_per_turn_and_others_are_served_between(tmp_path):
    (Path(tmp_path) / "plugins").write_text("rcpt_ok\nqueue/discard\n")
    clock = Clock()
    factory = SMTPFactory(Config(str(tmp_path)), clock=clock, lookups=LookupSettings(rdns=False))
    burst, burst_out = open_session(factory, 40001)
    other, other_out = open_session(factory, 40002)

    count = PIPELINE_STEP * 3 + 5
    burst.dataReceived(b"NOOP\r\n" * count)
    assert burst_out.value().count(b"\r\n") == PIPELINE_STEP  # one step, then the turn ends

    other.dataReceived(b"NOOP\r\n")  # another session's read in the meantime: answered now
    assert other_out.value().startswith(b"250 ")

    # The rest follows in later turns (the fake clock runs the steps of one advance at
    # once; the reactor runs each in its own iteration, after the other sessions' reads).
    clock.advance(0)
    assert burst_out.value() == b"250 2.0.0 OK\r\n" * count  # every reply, in order

    burst.dataReceived(b"QUIT\r\n")
    burst.connectionLost(None)
    assert not clock.getDelayedCalls() or all(
        call.getTime() > clock.seconds() for call in clock.getDelayedCalls()
    )  # nothing left to run for the closed session


def test_a_session_closed_mid_burst_parses_no_more(tmp_path):
    (Path(tmp_path) / "plugins").write_text("rcpt_ok\nqueue/discard\n")
    clock = Clock()
    factory = SMTPFactory(Config(str(tmp_path)), clock=clock, lookups=LookupSettings(rdns=False))
    burst, out = open_session(factory, 40003)
    burst.dataReceived(b"NOOP\r\n" * (PIPELINE_STEP * 2))
    assert out.value().count(b"\r\n") == PIPELINE_STEP
    burst.connectionLost(None)
    clock.advance(0)
    assert out.value().count(b"\r\n") == PIPELINE_STEP
