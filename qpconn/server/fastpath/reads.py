"""Socket events dispatched by the epoll reactor without its per-event call layers.

For every ready socket, Twisted's epoll reactor calls ``log.callWithLogger(selectable,
reactor._doReadOrWrite, selectable, fd, event)``: the selectable's ``logPrefix()`` becomes
the ``system`` of the legacy log context for the duration of the call (what ``log.msg`` and
``log.err`` lines made meanwhile are tagged with), and an exception that escapes is logged.
That passes through four Python calls (``callWithLogger``, ``log.callWithContext``,
``context.call``, the thread's tracker, its ``callWithContext``): about 1.2 µs per event,
measured, and an SMTP session that does not pipeline makes four events per message (MAIL,
RCPT, DATA, the text): about 4% of the server's CPU on the benchmark's workload ii.

:func:`install` gives the running epoll reactor a ``doIteration`` of its own that does the
same work in one frame: poll, look each descriptor up, push the same context (the current
legacy log context, ``ILogContext``, copied with ``system`` set to the prefix, on the
reactor thread's context stack), call ``_doReadOrWrite``, pop it, and log an exception
that escapes with ``log.err(system=prefix)`` once the context is popped, as
``callWithLogger`` does. Every selectable goes through it (listening ports, DNS sockets,
sessions): nothing a plugin or a log reader sees changes.

Fallback: anything but Twisted's own epoll reactor (another reactor, a subclass that
overrides ``doPoll``, a ``doIteration`` already replaced) or a Twisted whose private parts
used here (``_poller``, ``_selectables``, ``_doReadOrWrite``, the context tracker's
``currentContext().contexts`` stack) are missing or changed shape keeps Twisted's own dispatch:
:func:`install` returns False and changes nothing.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from twisted.python import context, log
from twisted.python.log import ILogContext

__all__ = ["install", "installed", "uninstall"]


def _epoll_reactor_class() -> type | None:
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # no epoll on this platform
        return None
    return EPollReactor


def _contexts() -> list[dict[Any, Any]] | None:
    """The reactor thread's stack of legacy log contexts, if it has the known shape."""
    current = getattr(context.theContextTracker, "currentContext", None)
    if current is None:
        return None
    contexts = getattr(current(), "contexts", None)
    if not isinstance(contexts, list) or not contexts or not isinstance(contexts[-1], dict):
        return None
    return contexts


def installed(reactor: Any) -> bool:
    """True when ``reactor`` dispatches its events through this module."""
    return getattr(reactor.__dict__.get("doIteration"), "qpconn_direct", False)


def install(reactor: Any) -> bool:
    """Make ``reactor`` (the running one) dispatch socket events directly; False when it
    cannot be done safely (see the module docstring), and then nothing changed."""
    if installed(reactor):
        return True
    epoll = _epoll_reactor_class()
    if epoll is None or not isinstance(reactor, epoll):
        return False
    cls = type(reactor)
    if cls.doIteration is not epoll.doPoll or cls.doPoll is not epoll.doPoll:
        return False  # a subclass dispatches in its own way
    if "doIteration" in reactor.__dict__:
        return False  # someone else replaced it already
    if not all(hasattr(reactor, name) for name in ("_poller", "_selectables", "_doReadOrWrite")):
        return False
    if not isinstance(reactor._selectables, dict) or _contexts() is None:
        return False
    reactor.doIteration = _direct_poll(reactor)
    return True


def uninstall(reactor: Any) -> None:
    """Give ``reactor`` back Twisted's own dispatch (tests)."""
    if installed(reactor):
        del reactor.doIteration


def _direct_poll(reactor: Any) -> Callable[[float | None], None]:
    read_or_write = reactor._doReadOrWrite
    err = log.err

    def poll(timeout: float | None) -> None:
        """One reactor iteration: Twisted's doPoll, with callWithLogger's work inline."""
        if timeout is None:
            timeout = -1  # wait until something happens
        selectables = reactor._selectables
        try:
            # At most one event per selectable, and no longer than the reactor asks.
            events = reactor._poller.poll(timeout, len(selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        if not events:
            return
        contexts = context.theContextTracker.currentContext().contexts
        outer = context.get(ILogContext) or {}  # the log context the events are handled in
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this same poll
            try:
                prefix = selectable.logPrefix()
            except KeyboardInterrupt:
                raise
            except BaseException:
                prefix = "(buggy logPrefix method)"
                err(system=prefix)
            inner = outer.copy()  # each call its own, as log.callWithContext makes it
            inner["system"] = prefix
            contexts.append({ILogContext: inner})
            try:
                try:
                    read_or_write(selectable, fd, event)
                finally:
                    contexts.pop()
            except KeyboardInterrupt:
                raise
            except BaseException:
                err(system=prefix)

    poll.qpconn_direct = True  # type: ignore[attr-defined]
    return poll
