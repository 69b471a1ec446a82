"""Running a command handler without a Deferred when it never waits.

Most SMTP commands finish without waiting on anything (every plugin hook of the command
answers synchronously), yet wrapping each handler coroutine in
``Deferred.fromCoroutine`` costs a Deferred, a callback chain and Twisted's trampoline
per command: about 6% of the server's CPU per message on the benchmark's workload ii.
:func:`start` steps the coroutine once itself; only a handler that actually waits is
handed to Twisted, from the point where it waits, with the same semantics
(exceptions thrown back in, cancellation reaching the awaited Deferred).

One difference with ``fromCoroutine``: the first step runs in the caller's contextvars
context rather than a copy. qpconn uses no context variables.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["start"]


def start(coro: Coroutine[Any, Any, Any]) -> tuple[Any, defer.Deferred[Any] | None]:
    """Run ``coro`` until it finishes or first waits.

    Returns ``(result, None)`` when it finished (``result`` is a :class:`Failure` if it
    raised an Exception), or ``(None, deferred)`` firing with its eventual result.
    """
    try:
        awaited = coro.send(None)
    except StopIteration as stop:
        return stop.value, None
    except Exception:
        return Failure(), None
    return None, defer.Deferred.fromCoroutine(_resume(coro, awaited))


async def _resume(coro: Coroutine[Any, Any, Any], awaited: Any) -> Any:
    """Carry on with ``coro``, which is suspended on ``awaited``, as Twisted would."""
    while True:
        try:
            # Twisted sends a yielded non-Deferred straight back; so do we.
            value = await awaited if isinstance(awaited, defer.Deferred) else awaited
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # CancelledError, the awaited Deferred's failure
            try:
                awaited = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            awaited = coro.send(value)
        except StopIteration as stop:
            return stop.value
