"""qpconn.kit.batchpool: jobs run in threads, their results reach the reactor in batches.

The pool is given a stand-in reactor that records ``callFromThread`` calls instead of
running them, so a test decides when "the reactor" runs: the batching is then a matter of
counting calls, not of timing. Waits are on events, bounded.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted

from qpconn.kit import threads as pools
from qpconn.kit.batchpool import BatchPool

WAIT = 10.0  # seconds; generous, only reached when something is broken


class RecordingReactor:
    """Keeps what workers ask the reactor to run; ``run_pending`` runs it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []
        self.lock = threading.Lock()
        self.called = threading.Condition(self.lock)

    def callFromThread(self, function: Any, *args: Any) -> None:
        with self.called:
            self.calls.append((function, args))
            self.called.notify_all()

    def wait_calls(self, count: int) -> None:
        with self.called:
            assert self.called.wait_for(lambda: len(self.calls) >= count, WAIT), self.calls

    def run_pending(self) -> int:
        with self.lock:
            calls, self.calls = self.calls, []
        for function, args in calls:
            function(*args)
        return len(calls)


def results(deferreds: list[Any]) -> list[Any]:
    out: list[Any] = []
    for deferred in deferreds:
        deferred.addBoth(out.append)
    return out


def test_jobs_finished_before_the_reactor_runs_come_back_in_one_call() -> None:
    reactor = RecordingReactor()
    pool = BatchPool("t", 4, reactor)
    release = threading.Event()
    finished = threading.Semaphore(0)

    def job(number: int) -> int:
        assert release.wait(WAIT)
        finished.release()
        return number * 10

    got = results([pool.submit(job, n) for n in range(6)])
    release.set()
    for _ in range(6):
        assert finished.acquire(timeout=WAIT)
    reactor.wait_calls(1)
    # Every job has returned; the first asked the reactor once, the others joined it.
    pool.stop()
    assert len(reactor.calls) == 1
    assert got == []  # nothing fires outside the reactor
    assert reactor.run_pending() == 1
    assert sorted(got) == [0, 10, 20, 30, 40, 50]


def test_a_result_after_a_hand_out_asks_the_reactor_again() -> None:
    reactor = RecordingReactor()
    pool = BatchPool("t", 2, reactor)
    first = results([pool.submit(lambda: "one")])
    reactor.wait_calls(1)
    reactor.run_pending()
    assert first == ["one"]
    second = results([pool.submit(lambda: "two")])
    reactor.wait_calls(1)  # not stranded behind the first batch's flag
    reactor.run_pending()
    pool.stop()
    assert second == ["two"]


def test_an_exception_reaches_the_deferred_as_it_was_raised() -> None:
    reactor = RecordingReactor()
    pool = BatchPool("t", 2, reactor)

    def broken() -> None:
        raise OSError(28, "No space left on device")

    got = results([pool.submit(broken), pool.submit(lambda: "fine")])
    reactor.wait_calls(1)
    pool.stop()
    while reactor.run_pending():
        pass
    errors = [r for r in got if not isinstance(r, str)]
    assert [r for r in got if isinstance(r, str)] == ["fine"]
    assert len(errors) == 1 and errors[0].check(OSError)
    assert errors[0].value.errno == 28


def test_threads_are_started_on_demand_and_never_more_than_size() -> None:
    reactor = RecordingReactor()
    pool = BatchPool("bounded", 3, reactor)
    release = threading.Event()
    started = threading.Semaphore(0)

    def job() -> str:
        started.release()
        assert release.wait(WAIT)
        return "done"

    assert pool._threads == []
    got = results([pool.submit(job) for _ in range(10)])
    for _ in range(3):
        assert started.acquire(timeout=WAIT)
    assert not started.acquire(timeout=0.2)  # the other 7 wait for a free thread
    assert len(pool._threads) == 3
    release.set()
    for _ in range(7):
        assert started.acquire(timeout=WAIT)
    pool.stop()
    while reactor.run_pending():
        pass
    assert got == ["done"] * 10


def test_stop_runs_the_queued_jobs_first_and_refuses_new_ones() -> None:
    reactor = RecordingReactor()
    pool = BatchPool("t", 1, reactor)
    ran: list[int] = []
    got = results([pool.submit(ran.append, n) for n in range(5)])
    pool.stop()
    assert ran == [0, 1, 2, 3, 4]
    workers = [thread for thread in threading.enumerate() if "qpconn-t-" in thread.name]
    assert not any(thread.is_alive() for thread in workers)
    reactor.run_pending()
    assert got == [None] * 5
    refused = results([pool.submit(ran.append, 9)])
    assert refused[0].check(RuntimeError)
    assert ran == [0, 1, 2, 3, 4]


@pytest_twisted.ensureDeferred
async def test_run_in_batch_pool_runs_in_a_thread_and_answers_in_the_reactor() -> None:
    reactor_thread = threading.get_ident()
    seen: list[int] = []

    def job() -> int:
        seen.append(threading.get_ident())
        return 7

    assert await pools.run_in_batch_pool("test-batch", 2, job) == 7
    assert seen and seen[0] != reactor_thread
    assert threading.get_ident() == reactor_thread


def test_inline_pools_runs_batch_pool_work_in_the_caller() -> None:
    seen: list[int] = []
    with pools.inline_pools("test-inline-batch"):
        deferred = pools.run_in_batch_pool("test-inline-batch", 2, lambda: seen.append(1) or 5)
    got = results([deferred])
    assert got == [5] and seen == [1]
    assert "test-inline-batch" not in pools._BATCH_POOLS


@pytest.fixture(autouse=True)
def _no_threads_left() -> Any:
    yield
    # Each test stops its pool; a worker left running would be a leak.
    for thread in threading.enumerate():
        if thread.name.startswith(("qpconn-t-", "qpconn-bounded-")):
            thread.join(WAIT)
            assert not thread.is_alive(), thread.name
