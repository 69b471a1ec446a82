"""qpconn.kit.groupsync: concurrent directory fsyncs are shared, and none is skipped.

Worker threads call :class:`DirectorySync.sync` on a real directory; ``os.fsync`` is
wrapped (the real call still happens) to record when each fsync starts and ends on one
shared clock of events, and to hold the first fsync until the other callers are waiting.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any

import pytest

from qpconn.kit import groupsync
from qpconn.kit.groupsync import DirectorySync, sync_directory

CALLERS = 8


class Recorder:
    """A wrapped os.fsync: numbered start/end events; the first call may be held."""

    def __init__(self, monkeypatch: Any, fail_first: bool = False) -> None:
        self.clock = itertools.count()
        self.lock = threading.Lock()
        self.syncs: list[tuple[int, int]] = []
        self.release = threading.Event()
        self.fail_first = fail_first
        self.calls = 0
        real = os.fsync

        def fsync(fd: int) -> None:
            with self.lock:
                self.calls += 1
                first = self.calls == 1
                start = next(self.clock)
            if first:
                assert self.release.wait(10), "the other callers never arrived"
                if self.fail_first:
                    raise OSError(5, "Input/output error")
            real(fd)
            with self.lock:
                self.syncs.append((start, next(self.clock)))

        monkeypatch.setattr(os, "fsync", fsync)

    def tick(self) -> int:
        with self.lock:
            return next(self.clock)


def wait_for_waiters(syncer: DirectorySync, count: int) -> None:
    """Until ``count`` callers sit in the condition (bounded)."""
    deadline = time.monotonic() + 10
    while len(syncer._cond._waiters) < count:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "callers did not queue up"
        time.sleep(0.001)


def run_callers(syncer: DirectorySync, recorder: Recorder) -> list[Any]:
    """CALLERS threads: the first starts an fsync that is held until the rest wait."""
    outcomes: list[Any] = [None] * CALLERS

    def call(index: int) -> None:
        began = recorder.tick()
        try:
            syncer.sync()
        except OSError as exc:
            outcomes[index] = exc
            return
        outcomes[index] = (began, recorder.tick())

    first = threading.Thread(target=call, args=(0,))
    first.start()
    deadline = time.monotonic() + 10
    while recorder.calls == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, CALLERS)]
    for thread in others:
        thread.start()
    wait_for_waiters(syncer, CALLERS - 1)
    recorder.release.set()
    for thread in [first, *others]:
        thread.join(10)
        assert not thread.is_alive()
    return outcomes


def test_callers_share_fsyncs_and_each_waits_for_one_begun_after_it(tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch)
    syncer = DirectorySync(str(tmp_path))
    outcomes = run_callers(syncer, recorder)
    # The held fsync covers only the first caller; the seven waiting share one more.
    assert len(recorder.syncs) == 2, recorder.syncs
    for began, returned in outcomes:
        assert any(began < start and end < returned for start, end in recorder.syncs), (
            began,
            returned,
            recorder.syncs,
        )


def test_a_failed_fsync_is_raised_to_every_caller_counting_on_it(tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch, fail_first=True)
    syncer = DirectorySync(str(tmp_path))
    outcomes = run_callers(syncer, recorder)
    # The first caller's fsync failed: it gets the error; the others were waiting for a
    # later fsync, which succeeds and covers them all.
    assert isinstance(outcomes[0], OSError) and outcomes[0].errno == 5
    assert all(isinstance(o, tuple) for o in outcomes[1:]), outcomes
    assert len(recorder.syncs) == 1
    # And the next caller gets a fresh fsync, not the old error.
    syncer.sync()
    assert len(recorder.syncs) == 2


def test_sync_directory_fsyncs_a_real_directory_and_reports_a_missing_one(tmp_path):
    sync_directory(str(tmp_path))
    assert str(tmp_path) in groupsync._SYNCS
    with pytest.raises(FileNotFoundError):
        sync_directory(str(tmp_path / "gone"))
