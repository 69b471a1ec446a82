"""One HTTP POST of a stored message, with one deadline, for ``queue/http``.

Twisted's own HTTP client (:class:`twisted.web.client.Agent`) does the protocol: treq
would add a dependency for conveniences (JSON, cookies, redirects) a message upload does
not use. What this module adds:

* :class:`MessageProducer` sends the message as the connection drains, one stored
  piece at a time, with its length known beforehand (``Content-Length``, no chunked
  encoding: some web frameworks still refuse a chunked upload);
* :func:`post` bounds the whole exchange (connecting, sending, the status line and the
  start of the answer) by one timeout. The status line decides: after a 2xx nothing more
  is read; after another status, at most :data:`MAX_ANSWER` octets of the body, until the
  deadline (its first line is the reason, and an endpoint answering with megabytes, or
  never finishing its answer, must not hold the delivery).

Connections are not kept alive: a POST that fails on a connection the server closed in
the meantime cannot be retried safely (the server may have taken the message), so each
message gets a fresh connection and its failure is always a real one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from qpconn.client.names import resolving_reactor

__all__ = ["MessageProducer", "HTTPAnswer", "post", "MAX_ANSWER"]

#: octets of an answer's body that are read at most
MAX_ANSWER = 4096


@implementer(IBodyProducer)
class MessageProducer:
    """The octets of ``chunks()`` (called anew for the upload), ``length`` in all."""

    def __init__(self, chunks: Callable[[], Iterable[bytes]], length: int) -> None:
        self.length = length
        self._chunks = chunks
        self._task: task.CooperativeTask | None = None

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        self._task = task.cooperate(self._write(consumer))
        done = self._task.whenDone()

        def stopped(reason: Failure) -> Any:
            # Stopped by the client (the connection failed): its own error is the answer,
            # so this one never fires, as Twisted's FileBodyProducer does.
            reason.trap(task.TaskStopped)
            return defer.Deferred()

        done.addCallbacks(lambda _: None, stopped)
        return done

    def _write(self, consumer: IConsumer) -> Iterator[None]:
        for chunk in self._chunks():
            if chunk:
                consumer.write(chunk)
                yield None

    def pauseProducing(self) -> None:
        if self._task is not None:
            self._task.pause()

    def resumeProducing(self) -> None:
        if self._task is not None:
            self._task.resume()

    def stopProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.stop()
            except (task.TaskDone, task.TaskStopped):
                pass


@dataclass(frozen=True)
class HTTPAnswer:
    """The status and the start of the body of an answer."""

    code: int
    phrase: str
    body: bytes


class _Start(Protocol):
    """Collects the first :data:`MAX_ANSWER` octets of a body, then hangs up."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.data += data
        if len(self.data) >= MAX_ANSWER:
            self.done.callback(self.data[:MAX_ANSWER])
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:  # the end of the body, or the connection lost: what came
            self.done.callback(self.data)

    def hang_up(self) -> None:
        """Read no more of the body (the connection is closed)."""
        if self.transport is not None:
            self.transport.stopProducing()

    def _cancel(self, _: defer.Deferred[bytes]) -> None:
        self.hang_up()


async def post(
    reactor: Any,
    url: bytes,
    headers: dict[bytes, list[bytes]],
    body: MessageProducer,
    timeout: float,
    resolver: Any = None,
) -> HTTPAnswer:
    """POST ``body`` to ``url``; the answer, or an exception.

    :class:`twisted.internet.defer.TimeoutError` when the deadline passed, whatever was
    being waited for; the connection's own errors otherwise
    (:class:`twisted.internet.error.ConnectionRefusedError`, ``DNSLookupError``,
    :class:`twisted.web.client.ResponseNeverReceived`, ...).
    """
    # The URL's host name is resolved by ``resolver`` (``--dns-server``) when given.
    named = resolving_reactor(reactor, resolver)
    agent = Agent(named, connectTimeout=timeout, pool=HTTPConnectionPool(reactor, False))
    deadline = reactor.seconds() + timeout
    asked = agent.request(b"POST", url, Headers(headers), body)
    asked.addTimeout(timeout, reactor)
    try:
        response = await asked
    except Exception as exc:
        # A request cancelled mid-way by the deadline fails with the client's own error
        # (ResponseNeverReceived holding a CancelledError), not addTimeout's.
        if any(reason.check(defer.CancelledError) for reason in getattr(exc, "reasons", ())):
            raise defer.TimeoutError(f"no answer within {timeout:g}s") from exc
        raise
    reader = _Start()
    response.deliverBody(reader)
    if 200 <= response.code < 300:
        reader.hang_up()  # the status is the whole answer: nothing to wait for
        data = b""
    else:  # the reason is the body's first line: what came of it by the deadline
        reader.done.addTimeout(max(0.0, deadline - reactor.seconds()), reactor)
        try:
            data = await reader.done
        except defer.TimeoutError:
            data = reader.data[:MAX_ANSWER]
    phrase = response.phrase.decode("latin-1", "replace") if response.phrase else ""
    return HTTPAnswer(int(response.code), phrase, data)
