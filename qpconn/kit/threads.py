"""Running synchronous libraries (pyspf, dkimpy, SQLite, redis-py) without blocking the reactor.

The SPF and DKIM libraries worth trusting are synchronous and do their own DNS. Rewriting
them on Deferreds would mean maintaining our own SPF and DKIM engines, so instead they run
in small, bounded thread pools, and their DNS questions are sent back to the reactor to be
asked through the server's resolver (:func:`qpconn.kit.dns.query`), with the server's DNS
timeout. A worker therefore never talks to the network itself, never consults the system
resolver, and never waits longer than the timeout it was given, even if the reactor is
shutting down: :func:`call_in_reactor` waits with a deadline, so stopping a pool at
shutdown cannot hang on a worker stuck in a DNS question.

Pools are shared per name (``"auth"`` for SPF and DKIM, ``"greylist"`` for its database),
started on first use and stopped when the reactor shuts down.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from qpconn.kit.batchpool import BatchPool
from qpconn.kit.dns import Answer, query

__all__ = [
    "worker_pool",
    "run_in_pool",
    "run_in_batch_pool",
    "inline_pools",
    "stop_pools",
    "call_in_reactor",
    "dns_bridge",
    "DNSFunction",
]

T = TypeVar("T")

#: name -> pool; one per name for the whole process
_POOLS: dict[str, ThreadPool] = {}

#: name -> batching pool (:mod:`qpconn.kit.batchpool`); one per name for the whole process
_BATCH_POOLS: dict[str, BatchPool] = {}

#: name -> how many ``inline_pools`` blocks currently ask for it
_INLINE: dict[str, int] = {}

#: ``lookup(name, rtype) -> Answer``, callable from a worker thread
DNSFunction = Callable[[str, str], Answer]


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def worker_pool(name: str, size: int = 4) -> ThreadPool:
    """The pool called ``name`` (created with at most ``size`` threads on first use)."""
    pool = _POOLS.get(name)
    if pool is None:
        reactor = _reactor()
        pool = ThreadPool(minthreads=0, maxthreads=max(1, size), name=f"qpconn-{name}")
        pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", _stop, name)
        _POOLS[name] = pool
    return pool


def _stop(name: str) -> None:
    pool = _POOLS.pop(name, None)
    if pool is not None:
        pool.stop()
    batch = _BATCH_POOLS.pop(name, None)
    if batch is not None:
        batch.stop()


def stop_pools() -> None:
    """Stop every pool now. A process whose reactor never runs (``python -m qpconn
    test``) has no shutdown to stop them, and their threads would keep it from exiting."""
    for name in list(_POOLS) + list(_BATCH_POOLS):
        _stop(name)


def run_in_pool(pool: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> Any:
    """``function(*args)`` in the named pool; a Deferred with its result."""
    if _INLINE.get(pool):
        return defer.maybeDeferred(function, *args, **kwargs)
    return threads.deferToThreadPool(_reactor(), worker_pool(pool), function, *args, **kwargs)


def run_in_batch_pool(
    pool: str, size: int, function: Callable[..., T], *args: Any
) -> defer.Deferred[T]:
    """``function(*args)`` in the batching pool ``pool`` (at most ``size`` threads, made on
    first use); a Deferred with its result.

    For many short jobs finishing close together (the Maildir queue's deliveries): their
    results come back to the reactor in one wake-up rather than one each
    (:class:`qpconn.kit.batchpool.BatchPool`). ``inline_pools`` applies as to
    :func:`run_in_pool`.
    """
    if _INLINE.get(pool):
        return defer.maybeDeferred(function, *args)
    batch = _BATCH_POOLS.get(pool)
    if batch is None:
        reactor = _reactor()
        batch = _BATCH_POOLS[pool] = BatchPool(pool, size, reactor)
        reactor.addSystemEventTrigger("during", "shutdown", _stop, pool)
    return batch.submit(function, *args)


@contextmanager
def inline_pools(*names: str) -> Iterator[None]:
    """While the block runs, work for the named pools runs inline, in the caller's thread.

    For :mod:`qpconn.testing`: a scripted session on a fake clock has no running reactor
    to hand a thread's result back, and a store (SQLite, Redis) needs none, so its work
    can simply be done in place. Not for pools whose work calls back into the reactor
    (``auth``: SPF and DKIM ask DNS through :func:`dns_bridge`): inline, that work would
    wait for the very thread it runs in.
    """
    for name in names:
        _INLINE[name] = _INLINE.get(name, 0) + 1
    try:
        yield
    finally:
        for name in names:
            _INLINE[name] -= 1
            if not _INLINE[name]:
                del _INLINE[name]


def call_in_reactor(function: Callable[[], Any], timeout: float) -> Any:
    """From a worker: run ``function`` (which may return a Deferred or coroutine) in the
    reactor thread and wait for its result, at most ``timeout`` seconds.

    Twisted's ``blockingCallFromThread`` waits forever; a worker must not, or a reactor
    that stops mid-question would leave it (and the pool's shutdown) hanging.
    """
    box: queue.Queue[Any] = queue.Queue(maxsize=1)

    def run() -> None:
        try:
            result = function()
        except Exception:
            box.put(Failure())
            return
        if hasattr(result, "__await__"):
            result = defer.ensureDeferred(result)
        if isinstance(result, defer.Deferred):
            result.addBoth(box.put)
        else:
            box.put(result)

    _reactor().callFromThread(run)
    try:
        result = box.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"no answer from the reactor within {timeout}s") from None
    if isinstance(result, Failure):
        result.raiseException()
    return result


def dns_bridge(server: Any) -> DNSFunction:
    """A blocking ``lookup(name, rtype) -> Answer`` for worker threads, asking the server's
    resolver with the server's DNS timeout; a lost answer counts as ``timeout``."""
    timeout = float(server.lookups.dns_timeout or 5.0)

    def lookup(name: str, rtype: str) -> Answer:
        def ask() -> Any:
            return query(server.resolver, name, rtype, server.clock, timeout)

        try:
            answer: Answer = call_in_reactor(ask, timeout + 1.0)
        except TimeoutError:
            return Answer("timeout")
        return answer

    return lookup
