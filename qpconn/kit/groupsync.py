"""Group commit for directory fsyncs: one ``fsync(dir)`` covers every rename made before it.

A Maildir delivery is durable once the file is fsynced, renamed into ``new/`` and ``new/``
itself is fsynced (the rename is a change to the directory). When many sessions deliver at
the same moment, each would fsync the same directory in turn, and each fsync waits for a
journal commit. But an fsync of the directory makes durable *every* rename done before it
started, so callers that arrive while one is running can share the next one instead of
queueing one each: the cost of directory syncs then scales with bursts, not with messages.

The guarantee is the same as calling ``os.fsync`` oneself: :meth:`DirectorySync.sync`
returns only after an fsync of the directory that *started after* the call began (hence
after the caller's rename) has completed without error; an error is raised to every caller
that was counting on that fsync.
"""

from __future__ import annotations

import os
import threading

__all__ = ["DirectorySync", "sync_directory"]


class DirectorySync:
    """Shared fsyncs of one directory, for worker threads (blocking calls)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition()
        #: fsyncs started / completed so far (a completed one covers callers registered
        #: before it started)
        self._started = 0
        self._done = 0
        self._running = False
        #: the error of the last failed fsync, with the number it had
        self._failed: tuple[int, OSError] | None = None

    def sync(self) -> None:
        """Return once an fsync of the directory begun after this call has succeeded."""
        with self._cond:
            # Any fsync that starts from now on covers us; the one running may not.
            mine = self._started + 1
            while True:
                if self._done >= mine:
                    return
                if self._failed is not None and self._failed[0] >= mine:
                    raise self._failed[1]
                if not self._running:
                    break
                self._cond.wait()
            self._running = True
            self._started += 1
            number = self._started
        error: OSError | None = None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            error = exc
        with self._cond:
            self._running = False
            if error is None:
                self._done = number
            else:
                self._failed = (number, error)
            self._cond.notify_all()
        if error is not None:
            raise error


_SYNCS: dict[str, DirectorySync] = {}
_SYNCS_LOCK = threading.Lock()


def sync_directory(path: str) -> None:
    """fsync ``path`` (a directory), sharing the fsync with concurrent callers."""
    syncer = _SYNCS.get(path)
    if syncer is None:
        with _SYNCS_LOCK:
            syncer = _SYNCS.setdefault(path, DirectorySync(path))
            if len(_SYNCS) > 4096:  # per-recipient Maildirs: keep the table bounded
                _SYNCS.clear()
                _SYNCS[path] = syncer
    syncer.sync()
