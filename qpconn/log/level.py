"""The ``loglevel`` setting: qpconn's own log events below it are never emitted.

Twisted's loggers have no threshold: every event is built, published and, by twistd's
file observer, formatted and written, whatever its level. Formatting and writing one line
costs about as much CPU as a whole 1 KiB message otherwise does (profiled on the
benchmark's workload ii: two log lines per message took a third of the server's time), so
chatty plugins matter on a busy server. :class:`LevelLogger` (the loggers of the core and
of every plugin) drops events below the process-wide threshold before any of that work.
The default (``debug``) emits everything.

The threshold is per process (loggers are module and class attributes), set once at
start-up by :func:`qpconn.app.service.make_service` from the config directory.
"""

from __future__ import annotations

import re
from time import time
from typing import Any

from twisted.logger import Logger, LogLevel

__all__ = [
    "LEVELS",
    "LevelLogger",
    "current_level",
    "is_twisted_chatter",
    "parse_level",
    "set_level",
    "wanted",
]

#: accepted names, lowest first (qpsmtpd's words and Twisted's)
LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}
_RANK = {
    LogLevel.debug: 0,
    LogLevel.info: 1,
    LogLevel.warn: 2,
    LogLevel.error: 3,
    LogLevel.critical: 4,
}
_threshold = 0


def parse_level(text: str) -> LogLevel:
    """The level named by ``text`` (case-insensitive); ValueError for anything else."""
    try:
        return LEVELS[text.strip().lower()]
    except KeyError:
        names = ", ".join(sorted(set(LEVELS) - {"warning"}))
        raise ValueError(f"loglevel {text!r}: expected one of {names}") from None


def set_level(level: LogLevel) -> None:
    """Emit qpconn's events at ``level`` and above from now on, in this process."""
    global _threshold
    _threshold = _RANK[level]


def current_level() -> LogLevel:
    return next(level for level, rank in _RANK.items() if rank == _threshold)


#: Twisted's own lines for each port it opens and closes, logged at info through its
#: legacy ``log.msg``: every DNS question (``--dns-server``, the plugins' lookups) opens a
#: UDP port and writes four ("DNSDatagramProtocol starting on N", "Starting protocol
#: <...DNSDatagramProtocol...>", "(UDP Port N Closed)", "Stopping protocol ..."); each
#: listener writes "<Factory> starting on N" without its address, which qpconn's own
#: "listening on ADDRESS" line replaces. They count as debug here.
_CHATTER = re.compile(
    r"\S+ starting on \S+"
    r"|\((?:UDP|TCP) Port \S+ Closed\)"
    r"|(?:Starting|Stopping) protocol <twisted\.names\.dns\.DNS(?:Datagram)?Protocol .*",
    re.S,
)


def is_twisted_chatter(event: dict[str, Any]) -> bool:
    """True for Twisted's per-port lines (see :data:`_CHATTER`): debug, not info."""
    if event.get("log_namespace") != "log_legacy":
        return False
    text = event.get("log_text")
    return isinstance(text, str) and _CHATTER.fullmatch(text) is not None


def wanted(event: dict[str, Any]) -> bool:
    """Whether qpconn's observers write ``event``: Twisted's chatter only at ``loglevel
    debug``. qpconn's own events below the threshold were never emitted at all."""
    return _threshold == 0 or not is_twisted_chatter(event)


class LevelLogger(Logger):
    """A Twisted Logger that drops events below the process's ``loglevel``.

    ``debug`` ... ``critical`` build the event from their keyword arguments directly:
    Twisted's versions pass them on to ``emit`` as ``**kwargs`` again, a second copy of
    a dict of fifteen fields for every transaction line.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        self.emit_fields(level, format, kwargs)  # kwargs is a dict of our own already

    def debug(self, format: str | None = None, **kwargs: Any) -> None:
        if _threshold <= 0:
            self._publish(LogLevel.debug, format, kwargs)

    def info(self, format: str | None = None, **kwargs: Any) -> None:
        if _threshold <= 1:
            self._publish(LogLevel.info, format, kwargs)

    def warn(self, format: str | None = None, **kwargs: Any) -> None:
        if _threshold <= 2:
            self._publish(LogLevel.warn, format, kwargs)

    def error(self, format: str | None = None, **kwargs: Any) -> None:
        if _threshold <= 3:
            self._publish(LogLevel.error, format, kwargs)

    def critical(self, format: str | None = None, **kwargs: Any) -> None:
        self._publish(LogLevel.critical, format, kwargs)  # the highest: always

    def emit_fields(self, level: LogLevel, format: str | None, fields: dict[str, Any]) -> None:
        """``emit(level, format, **fields)`` that makes ``fields`` itself the event (the
        caller gives it up): for an event built anew each time, such as a transaction's
        summary line, which would otherwise be copied once more as keyword arguments."""
        rank = _RANK.get(level)
        if rank is None:
            super().emit(level, format, **fields)  # not a level: Twisted's complaint
        elif rank >= _threshold:
            self._publish(level, format, fields)

    def _publish(self, level: LogLevel, format: str | None, event: dict[str, Any]) -> None:
        # Logger.emit's event, without its check of the level against a freshly sorted
        # list of every level (the callers compared ranks already)
        event["log_logger"] = self
        event["log_level"] = level
        event["log_namespace"] = self.namespace
        event["log_source"] = self.source
        event["log_format"] = format
        event["log_time"] = time()
        if "log_trace" in event:
            event["log_trace"].append((self, self.observer))
        self.observer(event)
