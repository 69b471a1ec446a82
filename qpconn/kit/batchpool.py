"""A thread pool for short blocking jobs whose results reach the reactor in batches.

Twisted's ``deferToThreadPool`` costs, per job, a hand-off through its worker team and one
``callFromThread``, and each ``callFromThread`` writes to the reactor's waker pipe and
makes the reactor wake up, read the pipe and run the call queue. For the Maildir queue
(one job per message, all finishing within the same few milliseconds because their
directory fsyncs are shared, :mod:`qpconn.kit.groupsync`) that is one wake-up per message
on the reactor thread, which is the busy one.

Here a job finished while the reactor has not yet collected the previous ones joins them:
only the first result of a batch calls ``callFromThread``, and the reactor hands out every
result collected by the time it runs. Jobs are queued in a :class:`queue.SimpleQueue`
(implemented in C: a put and a get cost no Python lock), and threads are started on
demand, one per job in flight, up to ``size``.

Nothing about a job's meaning changes: its Deferred fires, in the reactor thread, with
what the function returned or raised, never before the function has returned.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["BatchPool"]

#: what a worker takes to mean "stop"
_STOP = None


class BatchPool:
    """At most ``size`` threads running jobs; results handed back to ``reactor`` in batches.

    Only :meth:`submit` and :meth:`stop` are called from the reactor thread; the workers
    touch nothing but the job queue and the list of finished jobs (under its lock).
    """

    def __init__(self, name: str, size: int, reactor: Any) -> None:
        self.name = name
        self.size = max(1, size)
        self._reactor = reactor
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        #: jobs submitted whose result the reactor has not handed out yet (reactor thread)
        self._in_flight = 0
        self._done_lock = threading.Lock()
        #: (deferred, succeeded, result or Failure) finished, not yet handed out
        self._done: list[tuple[defer.Deferred[Any], bool, Any]] = []
        #: a hand-out is scheduled in the reactor (under ``_done_lock``)
        self._collecting = False
        self._stopped = False

    def submit(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``function(*args)`` in a worker thread; a Deferred with its result."""
        if self._stopped:
            return defer.fail(RuntimeError(f"the {self.name} pool is stopped"))
        result: defer.Deferred[Any] = defer.Deferred()
        self._in_flight += 1
        if self._in_flight > len(self._threads) and len(self._threads) < self.size:
            self._start_thread()
        self._jobs.put((result, function, args))
        return result

    def _start_thread(self) -> None:
        # Daemon threads: a worker stuck in a dead disk's fsync must not keep the
        # process from exiting; its message was not acknowledged (stop() says more).
        thread = threading.Thread(
            target=self._work, name=f"qpconn-{self.name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            result, function, args = job
            try:
                finished = (result, True, function(*args))
            except BaseException:
                finished = (result, False, Failure())
            with self._done_lock:
                self._done.append(finished)
                first = not self._collecting
                self._collecting = True
            if first:
                self._reactor.callFromThread(self._hand_out)

    def _hand_out(self) -> None:
        """In the reactor thread: fire every finished job's Deferred, in finishing order."""
        with self._done_lock:
            done, self._done = self._done, []
            self._collecting = False
        self._in_flight -= len(done)
        for result, succeeded, value in done:
            if succeeded:
                result.callback(value)
            else:
                result.errback(value)

    def stop(self, timeout: float = 10.0) -> None:
        """Let every worker finish its job and exit; wait for them at most ``timeout`` s.

        Jobs still queued run first (each worker takes one stop mark after them). A worker
        still blocked after the wait is left behind as a daemon thread: at shutdown the
        reactor no longer answers anyone, so its job's file stays in ``tmp/`` unacknowledged.
        """
        self._stopped = True
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join(timeout / max(1, len(self._threads)))
        self._threads = []
