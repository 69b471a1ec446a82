"""Replies on their way out: from the session core to the transport, then the close.

A component that :class:`~qpconn.server.protocol.SMTPServerProtocol` owns (``protocol.output``),
so that the adapter's loop stays about reading. What it keeps:

* **One write per pass.** All replies produced in one pass over the input leave with a
  single write: a reply split over several writes meets Nagle's algorithm and delayed
  ACKs and can stall a pipelining client for tens of milliseconds.
* **Held to the end of the turn.** With several sessions open, replies wait for the end
  of the reactor turn and leave one session after the other (:mod:`~qpconn.server.fastpath.
  turnend`), written straight to the socket when nothing is queued
  (:mod:`~qpconn.server.fastpath.fastwrite`); a closing reply, the ``220`` to STARTTLS and
  everything held before them go at once, in order.
* **Backpressure.** Held replies past :data:`HELD_REPLIES_LIMIT` are written at once: the
  transport must see a pipelined burst's replies to tell the protocol, its producer, to
  stop (``pauseProducing``). The protocol is registered as that producer here. The
  kernel's send buffer of the socket is bounded (:data:`SEND_BUFFER`): replies are small,
  and the default buffer grows to megabytes on a fast link (on loopback, measured: 3 MB,
  the replies to 225,000 NOOPs), all of it work the server did for a client that reads
  nothing, before Twisted's own buffer could fill and push back. Twisted's own mark is
  64 KiB, the size of its reads too, so the writer pushes back sooner itself: past
  :data:`UNSENT_REPLIES_LIMIT` of replies the kernel did not take, it pauses the protocol
  and lets Twisted resume it once they are sent (:mod:`~qpconn.server.fastpath.fastwrite`).
* **Closing.** :meth:`ReplyWriter.hang_up` unregisters the producer first (Twisted keeps a
  connection open while its producer is paused) and sets the idle timer once more: a
  client that does not take what is left within ``timeout`` is aborted by it. The session's
  last reply (``221``, ``421``) is handed to the close itself
  (:func:`~qpconn.server.fastpath.fastwrite.close_when_sent`): sent and closed in one step at
  the end of the turn, without Twisted's write pass on an empty buffer.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from qpconn.core.reply import Reply
from qpconn.core.session import State
from qpconn.server.fastpath import fastwrite
from qpconn.server.fastpath.turnend import at_turn_end

if TYPE_CHECKING:
    from qpconn.server.protocol import SMTPServerProtocol

__all__ = ["ReplyWriter", "HELD_REPLIES_LIMIT", "SEND_BUFFER", "UNSENT_REPLIES_LIMIT"]

#: Reply bytes held for the end of a reactor turn beyond which they are written at once.
HELD_REPLIES_LIMIT = 16 * 1024
#: Reply bytes the kernel did not take (Twisted holds them) beyond which the session stops
#: reading and parsing until they are sent. Twisted's own mark is 64 KiB, the replies to
#: some 4,600 NOOPs, each of which the server would parse and answer for a client that
#: reads none of them.
UNSENT_REPLIES_LIMIT = 4 * 1024
#: SO_SNDBUF of a session's socket (Linux doubles it for its own overhead): some 500
#: replies, more than a pipelining client that reads them has in flight (100 recipients'
#: replies are 3 KiB), and little work done for one that reads none. 32 KiB (measured:
#: 20 non-readers of bench/run's hostile workload cost the server 0.41 s of CPU, against
#: 0.10 s with 4 KiB) let a client that reads nothing have some 4,000 NOOPs answered.
SEND_BUFFER = 4 * 1024


def bound_send_buffer(transport: Any) -> None:
    """Cap the kernel's send buffer of a socket transport."""
    try:
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass  # the socket is gone already: the write path finds out


class ReplyWriter:
    """The output side of one session; see the module docstring."""

    # One per session, idle ones included: fields only, no attribute dict.
    __slots__ = (
        "_last",
        "_producing",
        "closed_with",
        "may_hold",
        "protocol",
        "session",
        "unsent",
        "unsent_size",
    )  # fmt: skip

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self.protocol = protocol
        self.session = protocol.session
        transport = protocol.transport
        #: real sockets only: a test's in-memory transport gets every reply at once
        self.may_hold = fastwrite.batchable(transport)
        #: reply bytes held until the end of this reactor turn, and their size
        self.unsent: list[bytes] = []
        self.unsent_size = 0
        #: the last reply line when the server ended the session with it (not 221): the
        #: disconnect line names it, so every session the server closed says why
        self.closed_with: str | None = None
        # Twisted tells the protocol when the write buffer fills and drains.
        transport.registerProducer(protocol, True)
        if self.may_hold:  # a socket of our own (not a test's in-memory transport, nor
            bound_send_buffer(transport)  # the TLS layer of an ssl: listener)
        self._producing = True
        #: the session's last reply, sent with the close (hang_up)
        self._last = b""

    def flush(self) -> None:
        """Write (or hold) what the core has to send; close after a session's last reply."""
        protocol = self.protocol
        session = self.session
        data = session.data_to_send()
        if protocol.lost:
            return
        state = session.state
        if data:
            if (
                self.may_hold
                and state is not State.CLOSED
                and state is not State.STARTTLS
                and len(protocol.factory.sessions) > 1
            ):
                # Sent with the other sessions' replies at the end of this turn.
                if not self.unsent:
                    at_turn_end(self.send_unsent)
                self.unsent.append(data)
                self.unsent_size += len(data)
                if self.unsent_size > HELD_REPLIES_LIMIT:
                    self.send_unsent()  # a pipelined burst: the transport must see it now
                return
            self.send_unsent()  # anything held goes first: bytes stay in order
            if state is State.CLOSED:
                # The last reply (221, 421) leaves with the close (hang_up below), in one
                # step, so the session's end is handled before the client can see it.
                self._last = data
            else:
                self._write(data)  # at once when nothing is queued
            if state is State.STARTTLS:
                protocol.tls.after_flush()  # the 220 to STARTTLS is out: handshake now
            state = session.state  # a TLS failure may have closed it
        if state is State.CLOSED:
            last = data.rstrip(b"\r\n").rpartition(b"\r\n")[2]  # the reply that ends it
            if last and self.closed_with is None and not last.startswith(b"221"):
                self.closed_with = last.decode("utf-8", "replace")
            self.send_unsent()
            self.hang_up()

    def send_unsent(self) -> None:
        """Write the reply bytes held for the end of the turn."""
        unsent = self.unsent
        if not unsent:
            return
        data = unsent[0] if len(unsent) == 1 else b"".join(unsent)
        unsent.clear()
        self.unsent_size = 0
        if not self.protocol.lost:
            self._write(data)

    def _write(self, data: bytes) -> None:
        """Write ``data``; past :data:`UNSENT_REPLIES_LIMIT` of it left unsent, stop
        reading until it is sent (Twisted resumes the protocol, its producer)."""
        transport = self.protocol.transport
        if fastwrite.write(transport, data) or not (self.may_hold and self._producing):
            return  # all sent; or not a socket of ours (Twisted's own mark applies)
        if fastwrite.queued(transport) > UNSENT_REPLIES_LIMIT and fastwrite.pause_until_drained(
            transport
        ):
            self.protocol.pauseProducing()

    def discard(self) -> None:
        """The client reads no more: what is held is dropped."""
        self.unsent.clear()
        self.unsent_size = 0

    def close_with(self, reply: Reply) -> None:
        """End the session with a reply no command asked for (421): written, then closed."""
        self.session.send_unsolicited(reply)
        self.flush()

    def hang_up(self) -> None:
        """Close once what is written is sent; the idle timer aborts it if that takes as
        long as the timer runs (the client does not read): it is set now if none runs
        (a hook of ours had set it aside, or the connection was refused before it)."""
        protocol = self.protocol
        transport = protocol.transport
        if self._producing:
            self._producing = False
            transport.unregisterProducer()  # a paused producer would keep it open
        last, self._last = self._last, b""
        # write(last) and loseConnection(), without Twisted's empty write pass
        fastwrite.close_when_sent(transport, last)
        if protocol.timeOut is None and not protocol.lost:
            protocol.setTimeout(protocol.factory.timeout)
