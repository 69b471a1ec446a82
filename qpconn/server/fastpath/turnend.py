"""Work left for the end of the current reactor turn, run by one ``callLater(0)``.

The replies of many sessions are held until the end of the reactor turn that produced
them (:meth:`qpconn.server.output.ReplyWriter.flush`). Each session used to
schedule its own ``callLater(0)``; a busy server makes several turns per message, and a
``DelayedCall`` costs a few microseconds to make, queue and run. :func:`at_turn_end`
gathers them: the first call of a turn schedules one ``callLater(0)`` (run after the
reactor has dispatched every ready socket of the turn, before it polls again) that runs
every function given during the turn, in order. Reactor thread only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

__all__ = ["at_turn_end"]

log = Logger(namespace="qpconn.turnend")

_pending: list[Callable[[], Any]] = []


def at_turn_end(function: Callable[[], Any]) -> None:
    """Call ``function()`` at the end of this reactor turn (from the reactor thread)."""
    _pending.append(function)
    if len(_pending) == 1:
        reactor = sys.modules.get("twisted.internet.reactor")
        if reactor is None:
            from twisted.internet import reactor
        reactor.callLater(0, _run)  # type: ignore[union-attr]


def _run() -> None:
    calls = _pending[:]
    _pending.clear()  # what the calls below leave for the end of a turn goes to the next
    for function in calls:
        try:
            function()
        except Exception:  # one failure must not keep the others from running
            log.failure("end-of-turn call {function!r} failed", function=function)
