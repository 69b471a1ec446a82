"""A minimal twisted.mail ESMTP sink: accepts every sender and recipient, discards the text.

The peer the benchmark compares qpconn with: what a Twisted user gets from
``twisted.mail.smtp`` with the least code. Run: ``python twisted_sink.py --port 2526``.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import defer, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class Discard:
    """Message text goes nowhere."""

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class AcceptAll:
    """Every sender and recipient is fine; no Received header is built."""

    def receivedHeader(self, helo, origin, recipients):  # type: ignore[no-untyped-def]
        return None

    def validateFrom(self, helo, origin):  # type: ignore[no-untyped-def]
        return origin

    def validateTo(self, user):  # type: ignore[no-untyped-def]
        return Discard


class SinkFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        proto = super().buildProtocol(addr)
        proto.delivery = AcceptAll()
        return proto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--hostname", default="bench.test", help="name in the greeting")
    parser.add_argument("--log", help="log file (as twistd would write one)")
    args = parser.parse_args()
    if args.log:
        globalLogBeginner.beginLoggingTo(
            [textFileLogObserver(open(args.log, "a"))],  # noqa: SIM115 - lives as long as we do
            redirectStandardIO=False,
        )
    factory = SinkFactory()
    factory.domain = args.hostname
    reactor.listenTCP(args.port, factory, interface=args.host)  # type: ignore[attr-defined]
    print(f"twisted.mail sink on {args.host}:{args.port}", file=sys.stderr, flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
