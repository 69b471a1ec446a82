"""One message on an open session, in process: the protocol path without kernel or reactor.

``python bench/inprocess.py [--sessions 10] [--messages 2000] [--runs 5] [--lockstep]`` drives
the real ``SMTPServerProtocol`` (the sink configuration: ``rcpt_ok``, ``queue/discard``) over
in-memory transports and prints the CPU time per message, the median of the runs. It is
the quick check of a change to the protocol path, before ``bench/run`` on real sockets:
the figures are not comparable with bench/run's, only with this script's own on the
same machine (run it on the old code, ``PYTHONPATH=OLD python bench/inprocess.py``, for
a side-by-side).

By default MAIL, RCPT and DATA arrive in one read (pipelined); ``--lockstep`` gives each
command a read of its own, as smtp-source sends them in bench/run's workload ii (it does
not pipeline): four reads per message, so the per-read work of the adapter counts as it
does on the real server.

The log goes where ``twistd qpconn`` sends it by default, through
:class:`~qpconn.log.fasttext.FastTextObserver` (into a sink that keeps nothing), so each
message's transaction line costs what it costs on the real server; without it the events
would wait in Twisted's start-up buffer behind its level filter, which the real server
does not have.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner

from qpconn.config import Config
from qpconn.log.fasttext import FastTextObserver
from qpconn.server.factory import SMTPFactory
from qpconn.server.peerinfo import LookupSettings

MESSAGE = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 13 + b".\r\n"  # ~1 KiB
ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\nDATA\r\n"
#: the same envelope, a read per command (--lockstep)
LOCKSTEP = [line + b"\n" for line in ENVELOPE.split(b"\n") if line]


class _Sink:
    """A text file that keeps nothing: the log lines are formatted, then dropped."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def log_as_twistd_does() -> None:
    """Send the log through twistd qpconn's default observer (see the module docstring)."""
    globalLogBeginner.beginLoggingTo(
        [FastTextObserver(_Sink())], discardBuffer=True, redirectStandardIO=False
    )


def open_sessions(factory: SMTPFactory, count: int) -> list[tuple[object, StringTransport]]:
    sessions = []
    for number in range(count):
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + number),
        )
        protocol = factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        protocol.dataReceived(b"EHLO bench.example\r\n")
        transport.clear()
        sessions.append((protocol, transport))
    return sessions


def one_run(sessions: int, messages: int, lockstep: bool = False) -> float:
    with tempfile.TemporaryDirectory() as directory:
        for name, text in (("me", "mx.test\n"), ("plugins", "rcpt_ok\nqueue/discard\n")):
            Path(directory, name).write_text(text)
        return measure(Config(directory), sessions, messages, lockstep)


def measure(config: Config, sessions: int, messages: int, lockstep: bool = False) -> float:
    factory = SMTPFactory(config, clock=Clock(), lookups=LookupSettings(rdns=False))
    opened = open_sessions(factory, sessions)
    gc.collect()
    started = time.process_time()
    for _ in range(messages // sessions):
        for protocol, transport in opened:
            if lockstep:
                for line in LOCKSTEP:
                    protocol.dataReceived(line)
            else:
                protocol.dataReceived(ENVELOPE)
            protocol.dataReceived(MESSAGE)
            if not transport.value().endswith(b"\r\n") or b"250 2.0.0" not in transport.value():
                raise SystemExit(f"the sink refused a message: {transport.value()!r}")
            transport.clear()
    spent = time.process_time() - started
    for protocol, _ in opened:
        protocol.dataReceived(b"QUIT\r\n")
    return spent / (messages // sessions * sessions)


def churn(config: Config, connections: int) -> float:
    """A new connection per message (workload iv): connect, EHLO, one message, QUIT."""
    factory = SMTPFactory(config, clock=Clock(), lookups=LookupSettings(rdns=False))
    script = b"EHLO bench.example\r\n" + ENVELOPE
    gc.collect()
    started = time.process_time()
    for number in range(connections):
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + number % 20000),
        )
        protocol = factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        protocol.dataReceived(script)
        protocol.dataReceived(MESSAGE)
        protocol.dataReceived(b"QUIT\r\n")
        protocol.connectionLost(None)
        if b"221 " not in transport.value():
            raise SystemExit(f"the session did not end with 221: {transport.value()!r}")
    return (time.process_time() - started) / connections


def one_churn_run(connections: int) -> float:
    with tempfile.TemporaryDirectory() as directory:
        for name, text in (("me", "mx.test\n"), ("plugins", "rcpt_ok\nqueue/discard\n")):
            Path(directory, name).write_text(text)
        return churn(Config(directory), connections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--lockstep", action="store_true",
        help="a read per command, as smtp-source sends them (workload ii's real shape)",
    )  # fmt: skip
    parser.add_argument(
        "--churn", type=int, default=0, metavar="N",
        help="instead: N connections of one message each (workload iv's path)",
    )  # fmt: skip
    args = parser.parse_args()
    log_as_twistd_does()
    if args.churn:
        results = [one_churn_run(args.churn) for _ in range(args.runs)]
    else:
        results = [one_run(args.sessions, args.messages, args.lockstep) for _ in range(args.runs)]
    what = "connection" if args.churn else "message"
    print(f"{statistics.median(results) * 1e6:.1f} us CPU per {what} "
          f"(median of {args.runs}; runs: {', '.join(f'{r * 1e6:.1f}' for r in results)})")


if __name__ == "__main__":
    main()
