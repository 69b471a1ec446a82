"""The idle timers of all of a server's sessions: one heap and one DelayedCall per factory.

Twisted's ``TimeoutMixin`` gives every session a DelayedCall of its own (about 400 bytes
with its entry in the reactor's heap) and moves it on every read. Held sessions are
mostly idle ones, so that timer was one of the largest parts of an idle session (issue
20). Here a session's idle timer is one small list in the factory's heap, ``[key, seq,
protocol, due]``:

* ``due`` is when the session times out; a read moves it later by writing one float
  (:meth:`IdleTimers.reset`), no heap operation. ``key`` is where the entry sits in the
  heap, at most ``due``: an entry that comes to the top before its ``due`` is pushed
  again at its ``due`` (a lazy heap), so a session that keeps talking costs one push per
  ``timeout``, not one per read.
* One DelayedCall on the factory's clock stands for the earliest key. It runs the entries
  whose ``due`` has come at exactly the clock time their own DelayedCall would have run
  (``timeoutConnection`` is called when TimeoutMixin called it).
* A session that closes nulls its entry's ``protocol`` (:meth:`IdleTimers.cancel`), so it
  is freed by reference counting as before, and its dead entry is dropped when it comes
  to the top, or sooner, when dead entries outnumber the live ones (compaction keeps the
  heap within twice the open sessions under any connection churn). With no session
  armed, the heap is emptied and the DelayedCall cancelled: no timer outlives the
  sessions.

:class:`OwnTimers` keeps Twisted's way, a DelayedCall per session, for a protocol given
its own ``callLater`` (``proto.callLater = clock.callLater``, as the testing kit does).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

if TYPE_CHECKING:
    from qpconn.server.protocol import SMTPServerProtocol

__all__ = ["IdleTimers", "OwnTimers"]

# The fields of an entry (a list: the smallest mutable record that needs no class)
_KEY, _SEQ, _PROTOCOL, _DUE = range(4)

#: dead entries tolerated before they may be compacted away, whatever the live count
_COMPACT_FLOOR = 64


class IdleTimers:
    """The idle timers of one factory's sessions (see the module docstring).

    The protocol calls :meth:`arm` when a timeout is set and none runs, :meth:`reset` to
    move it (a read, a new period), :meth:`cancel` to stop it; the handle is the entry,
    and ``reset`` gives back the one to keep (a new one when the timer moves earlier).
    When a timer runs out, the protocol's ``idle_expired()`` is called (and the entry is
    spent: the protocol forgets it there).
    """

    __slots__ = ("_call", "_dead", "_heap", "_live", "_seq", "clock")

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._heap: list[list[Any]] = []
        #: entries in the heap whose protocol is still armed, and those cancelled
        self._live = 0
        self._dead = 0
        self._seq = 0
        #: the DelayedCall for the heap's earliest key (None: the heap is empty)
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        """Sessions whose idle timer runs."""
        return self._live

    def arm(self, protocol: SMTPServerProtocol, period: float) -> list[Any]:
        """Start ``protocol``'s timer: it runs out ``period`` seconds from now."""
        due = self.clock.seconds() + period
        self._seq += 1
        entry = [due, self._seq, protocol, due]
        self._live += 1
        heap = self._heap
        heapq.heappush(heap, entry)
        if heap[0] is entry:
            self._schedule(due)
        return entry

    def reset(self, entry: list[Any], period: float) -> list[Any]:
        """Make ``entry``'s timer run out ``period`` seconds from now; returns the entry
        to keep. Later than its key (a read, the usual case): one float written."""
        due = self.clock.seconds() + period
        if due >= entry[_KEY]:
            entry[_DUE] = due
            return entry
        protocol = entry[_PROTOCOL]
        self.cancel(entry)  # earlier than its place in the heap: a new place
        return self.arm(protocol, period)

    def cancel(self, entry: list[Any]) -> None:
        """Stop ``entry``'s timer and let go of its protocol."""
        if entry[_PROTOCOL] is None:
            return
        entry[_PROTOCOL] = None
        self._live -= 1
        self._dead += 1
        if not self._live:
            self._clear()
        elif self._dead > _COMPACT_FLOOR and self._dead > self._live:
            self._compact()

    # -- the heap -------------------------------------------------------------------------
    def _schedule(self, key: float) -> None:
        """The DelayedCall runs at clock time ``key`` (not a rounding later)."""
        clock = self.clock
        now = clock.seconds()
        delay = max(0.0, key - now)
        # now + (key - now) can round above key: the call would run later than the
        # session's own DelayedCall did (bounded: each step lowers the sum by an ulp).
        for _ in range(4):
            if now + delay <= key or delay == 0.0:
                break
            delay = max(0.0, delay - math.ulp(key))
        call = self._call
        if call is not None and call.active():
            if call.getTime() <= now + delay:
                return  # it runs first anyway: it finds this entry and schedules again
            call.cancel()
        self._call = clock.callLater(delay, self._run)

    def _run(self) -> None:
        """The earliest key has come: time out the sessions that are due, push again the
        ones that talked since (at their due), drop the dead, schedule the next."""
        self._call = None
        heap = self._heap
        now = self.clock.seconds()
        expired: list[Any] = []
        while heap and heap[0][_KEY] <= now:
            entry = heapq.heappop(heap)
            protocol = entry[_PROTOCOL]
            if protocol is None:
                self._dead -= 1
                continue
            due = entry[_DUE]
            if due > now:
                self._seq += 1
                entry[_KEY], entry[_SEQ] = due, self._seq
                heapq.heappush(heap, entry)
                continue
            entry[_PROTOCOL] = None
            self._live -= 1
            expired.append(protocol)
        # The expired run after the heap is consistent: a timeout arms the next timer
        # (the abort after a 421), which must land in the heap, not in this loop.
        for protocol in expired:
            protocol.idle_expired()
        if not self._live:
            self._clear()  # only dead entries left (or none)
        elif self._call is None:
            self._schedule(self._heap[0][_KEY])

    def _compact(self) -> None:
        """Drop the dead entries (sessions closed long before their timeout)."""
        self._heap = [entry for entry in self._heap if entry[_PROTOCOL] is not None]
        heapq.heapify(self._heap)
        self._dead = 0

    def _clear(self) -> None:
        """No session is armed: nothing stays behind, not even the DelayedCall."""
        self._heap.clear()
        self._dead = 0
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


class OwnTimers:
    """Twisted's way, for a protocol with a ``callLater`` of its own: a DelayedCall per
    session, made by that ``callLater`` (the handle is the DelayedCall)."""

    __slots__ = ("call_later",)

    def __init__(self, call_later: Callable[..., IDelayedCall]) -> None:
        self.call_later = call_later

    def arm(self, protocol: SMTPServerProtocol, period: float) -> IDelayedCall:
        return self.call_later(period, protocol.idle_expired)

    def reset(self, call: IDelayedCall, period: float) -> IDelayedCall:
        call.reset(period)
        return call

    def cancel(self, call: IDelayedCall) -> None:
        if call.active():
            call.cancel()
