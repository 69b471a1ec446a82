"""Spool files: message bodies past ``size_threshold``, and the clean-up after a crash.

A transaction removes its own spool file when it ends, whatever way it ends (see
:meth:`qpconn.mail.transaction.Transaction.close`). A process killed with ``kill -9`` cannot,
so its files stay behind. Their names carry the process id that wrote them
(``qpconn-<pid>-<random>.spool``), which lets a starting server remove the files of
processes that no longer run without touching those of a live sibling sharing the spool
directory (several worker processes, a second instance).
"""

from __future__ import annotations

import os
import tempfile

from twisted.logger import Logger

__all__ = ["clean_stale_spool", "spool_prefix"]

log = Logger(namespace="qpconn.spool")


def spool_prefix() -> str:
    """The file name prefix for this process's spool files."""
    return f"qpconn-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_spool(directory: str | None) -> list[str]:
    """Remove the spool files of dead processes from ``directory`` (None: the system's
    temporary directory, where spool files go without ``spool_dir``); return their paths.

    Files of this process and of live processes are kept, as are files named otherwise.
    Never raises: a spool directory that cannot be read is the next write's problem.
    """
    directory = directory or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith("qpconn-") and name.endswith(".spool")):
            continue
        pid_text = name[len("qpconn-") :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid == os.getpid() or _alive(pid):
            continue
        path = os.path.join(directory, name)
        try:
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    if removed:
        log.info("removed {count} stale spool files from {dir}", count=len(removed), dir=directory)
    return removed
