"""``twistd qpconn``'s default text log: twistd's lines and files, qpconn's cheap observer.

Without ``--logger`` or ``--syslog`` twistd writes a text log: standard output with
``-n``, ``--logfile=PATH`` (``-`` for standard output), else ``twistd.log``; a file is a
:class:`twisted.python.logfile.LogFile`, rotated at 1 MB and on ``SIGUSR1``. twistd's
observer formats every event in pure Python and writes each line on its own, which on a
busy server costs as much CPU as a third of the SMTP work (see bench/RESULTS.md).

:func:`default_observer` makes the same choice of file, with the same rotation, and
writes through :class:`qpconn.log.fasttext.FastTextObserver`: the same bytes per line,
formatted cheaply and written once per reactor turn. twistd uses an application's
``ILogObserver`` component instead of its own observer when no ``--logger`` is given;
:class:`DefaultTextLog` sets it when twistd adds qpconn's service to its application.
``--logger`` (JSON, or any other observer) and ``--syslog`` work as in twistd.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Mapping
from typing import IO, Any

from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver
from twisted.python.logfile import LogFile

from qpconn.log.fasttext import FastTextObserver

__all__ = ["DefaultTextLog", "default_observer"]


def default_observer(twistd_options: Mapping[str, Any] | None) -> ILogObserver | None:
    """The text log twistd would open for these options, or None to leave it to twistd.

    None under ``--logger`` or ``--syslog``, outside twistd (no options), and for a
    daemon told to log to standard output (twistd refuses that itself, with a message).
    """
    if twistd_options is None:
        return None
    try:
        if twistd_options.get("logger") or twistd_options.get("syslog"):
            return None
        path = twistd_options.get("logfile") or ""
        nodaemon = bool(twistd_options.get("nodaemon"))
    except AttributeError:
        return None
    out: IO[str] | LogFile
    if path == "-":
        if not nodaemon:
            return None
        out = sys.stdout
    elif nodaemon and not path:
        out = sys.stdout
    else:
        out = LogFile.fromFullPath(path or "twistd.log")
    observer = FastTextObserver(out)  # type: ignore[arg-type]
    if isinstance(out, LogFile):
        _rotate_on_sigusr1(out, observer)
    return observer


def _rotate_on_sigusr1(log_file: LogFile, observer: FastTextObserver) -> None:
    """As twistd does for its own log file: SIGUSR1 rotates it, unless the signal is taken.

    The lines logged before the signal and still waiting to be written go to the old
    file first: they belong to the period it covers.
    """
    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate_now() -> None:
        observer.flush()
        log_file.rotate()

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(rotate_now)  # type: ignore[attr-defined]

    signal.signal(signal.SIGUSR1, rotate)


class DefaultTextLog(MultiService):
    """Holds qpconn's service; gives twistd's application its default text log observer.

    twistd builds the application (``Application(...)``) and adds the plugin's service to
    it before it starts logging; :meth:`setServiceParent` is where the application is
    seen, so the observer is set there, unless the application already has one.
    """

    def __init__(self, inner: IService, twistd_options: Mapping[str, Any] | None) -> None:
        super().__init__()
        self.inner = inner
        self._options = twistd_options
        inner.setServiceParent(self)

    def __getattr__(self, name: str) -> Any:
        # factory, ... of the wrapped service (tests and tools reach through to them)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def setServiceParent(self, parent: Any) -> None:
        get_component = getattr(parent, "getComponent", None)
        if get_component is not None and get_component(ILogObserver, None) is None:
            observer = default_observer(self._options)
            if observer is not None:
                parent.setComponent(ILogObserver, observer)
        super().setServiceParent(parent)
