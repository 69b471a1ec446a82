"""Writing a stored message to a transport (a socket or a process's stdin) with flow control.

A message may be tens of megabytes, spooled to disk. Writing it in one go would copy it
all into the transport's buffer; :class:`ChunkProducer` instead hands the transport one
piece at a time, when it asks for more (Twisted's pull-producer protocol), so memory stays
at one chunk per delivery however large the message is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IPullProducer
from zope.interface import implementer

__all__ = ["ChunkProducer", "DotStuffer", "to_lf"]


@implementer(IPullProducer)
class ChunkProducer:
    """Feeds ``chunks`` to ``consumer``; :meth:`start` returns a Deferred for the end.

    ``transform`` turns each chunk into the bytes written (dot-stuffing, line endings);
    ``trailer`` is called once after the last chunk for what must close the stream.
    """

    def __init__(
        self,
        consumer: IConsumer,
        chunks: Iterable[bytes],
        transform: Callable[[bytes], bytes] | None = None,
        trailer: Callable[[], bytes] | None = None,
    ) -> None:
        self.consumer = consumer
        self._chunks: Iterator[bytes] = iter(chunks)
        self._transform = transform
        self._trailer = trailer
        self._done: defer.Deferred[None] = defer.Deferred()
        self._finished = False

    def start(self) -> defer.Deferred[None]:
        # A pull producer is asked for its first piece as soon as it is registered.
        self.consumer.registerProducer(self, False)
        return self._done

    def resumeProducing(self) -> None:
        if self._finished:
            return
        try:
            chunk = next(self._chunks, None)
            if chunk is None:
                tail = self._trailer() if self._trailer is not None else b""
                if tail:
                    self.consumer.write(tail)
                self._finish(None)
                return
            data = self._transform(chunk) if self._transform is not None else chunk
            if data:
                self.consumer.write(data)
        except Exception as exc:  # a spool file that cannot be read, a closed consumer
            self._finish(exc)

    def stopProducing(self) -> None:
        """The consumer went away (connection lost, process exited) before the end."""
        self._finish(ConnectionLost("the receiver closed before the whole message was sent"))

    def _finish(self, error: BaseException | None) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            self.consumer.unregisterProducer()
        except Exception:
            pass
        if error is None:
            self._done.callback(None)
        else:
            self._done.errback(error)


class DotStuffer:
    """SMTP transparency (RFC 5321 §4.5.2) over a message that arrives in pieces.

    A ``.`` at the start of a line is doubled, whichever piece the line starts in, and
    :meth:`end` gives the terminator, with a CRLF first if the text did not end with one.
    """

    def __init__(self) -> None:
        self._tail = b"\r\n"  # the text so far ended like a line: the start counts as one

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        carried = self._tail
        joined = carried + chunk
        stuffed = joined.replace(b"\r\n.", b"\r\n..")
        self._tail = joined[-2:]
        # The carried bytes were written with the previous piece. A match is 3 bytes, so
        # it always inserts its dot inside ``chunk``: the first bytes are ``carried``.
        return stuffed[len(carried) :]

    def end(self) -> bytes:
        return b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"


def to_lf(chunk: bytes, state: list[bytes]) -> bytes:
    """CRLF -> LF across pieces (``state`` carries a CR that ended the previous piece)."""
    data = state[0] + chunk if state and state[0] else chunk
    carry = b""
    if data.endswith(b"\r"):
        data, carry = data[:-1], b"\r"
    if state:
        state[0] = carry
    else:
        state.append(carry)
    return data.replace(b"\r\n", b"\n")
