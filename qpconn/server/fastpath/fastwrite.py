"""Writing replies straight to the socket, those of one reactor turn together.

Twisted's ``transport.write()`` never sends at once: it queues the bytes, registers the
socket for writability (an ``epoll_ctl``), and sends on the next reactor iteration, which
then unregisters it (another ``epoll_ctl``). For an SMTP server that answers every
command with one short reply, that is two system calls and a reactor dispatch per reply
on top of the ``send()`` itself (about a tenth of the CPU per message on the benchmark).

:func:`write` sends directly when that changes nothing a peer or Twisted could observe:
a plain TCP transport (no TLS layer), connected, not closing, nothing already queued (so
the order of bytes is kept). Whatever the kernel does not take at once -- and every
error -- goes through ``transport.write()`` as before, which queues it and lets Twisted
report a broken connection its usual way. Any other transport is simply written to.

With several sessions open, the protocol holds the replies produced during one reactor
turn and sends them one after the other at the end of that turn (through
:func:`~qpconn.server.fastpath.turnend.at_turn_end`), as Twisted's own write path does, but
without its two ``epoll_ctl`` calls per reply. Sending each reply the moment it is ready,
between the reads of the same turn, cost a quarter more CPU per message on the benchmark's
50-session workload, most of it in the kernel (measured: 885 vs 709 CPU ticks for 40,000
messages); with a single session there is nothing to group and the reply goes out at
once.

The close after a session's last reply (:func:`close_when_sent`) is the same saving at the
end: ``loseConnection()`` on a socket whose buffer is already empty still registers it for
writability (an ``epoll_ctl``), waits for the next reactor iteration to find nothing to
write, then unregisters it (another) before it closes. A connection per message pays that
on every message; here the socket stops being read at once, and at the end of the turn the
last reply is sent and the connection closed in one step, as Twisted's write pass would
have done (``connectionLost`` with ``ConnectionDone``): two ``epoll_ctl`` and one reactor
dispatch fewer per connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import main, tcp
from twisted.python.failure import Failure

from qpconn.server.fastpath.turnend import at_turn_end

__all__ = ["write", "batchable", "queued", "pause_until_drained", "close_when_sent"]


def write(transport: Any, data: bytes) -> bool:
    """Send ``data`` on ``transport`` now if nothing is queued, else queue it as usual.

    True when all of it went to the kernel; False when some of it waits in Twisted's
    write buffer (the socket's send buffer was full, or something was queued already).
    """
    if isinstance(transport, tcp.Connection) and _idle(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or a broken connection: Twisted's write path finds out
        if sent >= len(data):
            return True
        data = data[sent:]
    transport.write(data)
    return False


def queued(transport: Any) -> int:
    """Bytes Twisted's write buffer holds for ``transport`` that are not sent yet
    (0 when its internals are not there: then only Twisted's own high-water mark acts)."""
    try:
        if transport.TLS:  # the buffer holds TLS records, and the TLS layer's own
            return 0
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except (AttributeError, TypeError):
        return 0


def pause_until_drained(transport: Any) -> bool:
    """Mark the streaming producer of ``transport`` paused, as Twisted does when its
    buffer passes ``bufferSize``, so that Twisted resumes it once the buffer is sent.

    The caller then pauses the producer itself. Twisted's own mark is ``bufferSize``
    (64 KiB), which is also the size of its reads, so it cannot be lowered for the
    writes alone. False (nothing done) on a transport without that flag.
    """
    if not isinstance(transport, tcp.Connection) or transport.producer is None:
        return False
    if not hasattr(transport, "producerPaused"):
        return False
    transport.producerPaused = True
    return True


def close_when_sent(transport: Any, last: bytes = b"") -> None:
    """Send ``last`` (the session's last reply, if any) and close once everything written
    is sent: ``write(last)`` then ``loseConnection()``, in effect.

    For a socket with nothing queued, reading stops now, and the reply is sent and the
    socket closed together at the end of the turn. Anything else (queued bytes, TLS,
    another transport, a Twisted without the attributes read here) gets exactly those two
    calls: the same promise, Twisted's way.
    """
    if not (isinstance(transport, tcp.Connection) and _idle(transport)):
        if last:
            transport.write(last)
        transport.loseConnection()
        return
    transport.stopReading()  # as loseConnection() does: what the client sends now is unread
    at_turn_end(lambda: _send_and_close(transport, last))


def _send_and_close(transport: tcp.Connection, last: bytes) -> None:
    """The end of the turn: the last reply out, the connection closed, in one step."""
    if not transport.connected or transport.disconnecting:
        return  # lost meanwhile (nothing can be sent), or closing already
    if last:
        write(transport, last)  # whatever the kernel does not take is queued
    if not _idle(transport):  # bytes queued: Twisted sends them, then closes
        transport.loseConnection()
        return
    transport.connectionLost(Failure(main.CONNECTION_DONE))


def batchable(transport: Any) -> bool:
    """True for a transport of the running reactor whose replies may be held to a turn's end.

    Only real sockets: a test's in-memory transport (with a fake clock that never turns)
    gets its bytes at once, as before.
    """
    return isinstance(transport, tcp.Connection)


def _idle(transport: tcp.Connection) -> bool:
    """Plain TCP, open, and nothing queued: sending now cannot reorder bytes.

    Some of these are Twisted's private write-buffer attributes (FileDescriptor): a
    Twisted that renames them raises AttributeError here, which means "not idle", so it
    only loses the shortcut.
    """
    try:
        return (
            not transport.TLS
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._tempDataLen
            and transport.offset >= len(transport.dataBuffer)
        )
    except AttributeError:
        return False
