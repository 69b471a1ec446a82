"""One request, one answer, over TCP or a unix socket: the shape of spamd and clamd.

Both daemons read a request, write their answer and close the connection. :func:`exchange`
does exactly that on the reactor, bounded by one deadline for connecting, sending and
reading, and by a cap on the answer's size, so a daemon that hangs or floods costs a
session at most ``timeout`` seconds and a little memory. Every failure is a
:class:`ScanError`; the plugins turn it into their configured action.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

__all__ = ["ScanError", "endpoint", "exchange"]

#: largest answer read from a daemon
MAX_ANSWER = 1 << 20


class ScanError(Exception):
    """The daemon could not be reached, did not answer in time, or answered nonsense."""


def endpoint(reactor: Any, address: str, timeout: float) -> Any:
    """A client endpoint for ``/path/to/socket``, ``unix:/path``, ``host:port``, ``[v6]:port``."""
    if address.startswith("unix:"):
        address = address[5:]
    if address.startswith("/"):
        return UNIXClientEndpoint(reactor, address, timeout=timeout)
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{address!r} is not a socket path or host:port")
    if host.startswith("[") and host.endswith("]"):
        return TCP6ClientEndpoint(reactor, host[1:-1], int(port), timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, int(port), timeout=timeout)


class _Exchange(Protocol):
    def __init__(self, request: Iterable[bytes], limit: int) -> None:
        self.request = request
        self.limit = limit
        self.received: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        for chunk in self.request:
            self.transport.write(chunk)

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self._finish(Failure(ScanError(f"answer longer than {self.limit} octets")))
            self.transport.abortConnection()
            return
        self.received.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._finish(b"".join(self.received))

    def _finish(self, result: Any) -> None:
        if self.done.called:
            return
        if isinstance(result, bytes):
            self.done.callback(result)
        else:
            self.done.errback(result)


async def exchange(
    reactor: Any, address: str, request: Iterable[bytes], timeout: float, limit: int = MAX_ANSWER
) -> bytes:
    """Send ``request`` to the daemon at ``address``; its whole answer, once it closes."""
    protocol = _Exchange(request, limit)
    waiting = endpoint(reactor, address, timeout).connect(Factory.forProtocol(lambda: protocol))
    deadline = reactor.callLater(timeout, lambda: _expire(waiting, protocol, timeout))
    try:
        await waiting
        return await protocol.done
    except ScanError:
        raise
    except defer.CancelledError:
        raise ScanError(f"no answer within {timeout:g} s") from None
    except Exception as exc:
        raise ScanError(str(exc) or type(exc).__name__) from None
    finally:
        if deadline.active():
            deadline.cancel()


def _expire(waiting: defer.Deferred[Any], protocol: _Exchange, timeout: float) -> None:
    if not waiting.called:
        waiting.cancel()
        return
    protocol._finish(Failure(ScanError(f"no answer within {timeout:g} s")))
    if protocol.transport is not None:
        protocol.transport.abortConnection()
