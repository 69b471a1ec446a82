"""A text log observer that writes twistd's line format at a fraction of its CPU cost.

twistd's own text log (``textFileLogObserver``) formats every event in pure Python --
``string.Formatter`` parses the format string, each field is wrapped for Twisted's
``{name()}`` call syntax, the time stamp is recomputed with time-zone arithmetic -- and
then writes and flushes the file once per line. On a busy SMTP server that is about a
quarter of the CPU spent per message (profiled in bench/RESULTS.md), for a line whose
shape never changes.

:class:`FastTextObserver` writes the same bytes (``formatEventAsClassicLogText`` with
twistd's RFC 3339 time stamps) but

- parses each distinct format string once to check that it holds only the plain
  ``{name}`` / ``{name!r}`` / ``{name:.3f}`` fields qpconn's events use, for which
  ``str.format_map`` gives exactly what Twisted would, and turns it into an f-string
  function giving the same text at a fraction of format_map's cost; anything else
  (``{a.b}``, ``{f()}``, ``{x[0]}``, nested specs, flattened events, failures with
  tracebacks) and any formatting error goes through Twisted's own formatter, so the
  text is always what twistd would have written;
- formats the time stamp once per second;
- collects lines for up to ``FLUSH_DELAY`` (50 ms) and writes them with one ``write()``
  + ``flush()`` (at once when no reactor runs; from another thread's events on the next
  reactor turn; after 1000 pending lines; at reactor shutdown and at exit, so a clean
  stop loses nothing). A write per reactor turn was a write() system call per message
  on a server taking a new connection per message, 4-6% of its CPU; a line now reaches
  the file at most 50 ms after it was logged.

Use it with ``twistd --logger=qpconn.log.observers.fast_text`` (see docs/running.md).
"""

from __future__ import annotations

import atexit
import re
import string
import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import IO, Any

from twisted.logger import ILogObserver, formatEventAsClassicLogText, formatTime
from twisted.python import threadable
from zope.interface import implementer

from qpconn.log.level import wanted

__all__ = ["FastTextObserver"]

#: a line is flushed at the latest after this many are pending
MAX_PENDING = 1000
#: seconds a line may wait for others before the pending lines are written
FLUSH_DELAY = 0.05

#: renders an event's text from its fields, as ``str.format_map`` would
_Render = Callable[[dict[str, Any]], str]
_NOT_SEEN: Any = object()
_parse = string.Formatter().parse
# Format specs the renderer passes on to format() as they are; anything else (nested
# fields, odd characters) keeps the format string on Twisted's formatter.
_PLAIN_SPEC = re.compile(r"[-+ #0-9.,_<>=^a-zA-Z%]*")


def _compile(fmt: str) -> _Render | None:
    """A function giving ``fmt.format_map(event)``, or None when the format needs
    Twisted's formatter (see module doc).

    The function is one f-string (made once per distinct format): CPython runs an
    f-string's fields as bytecode, where ``str.format_map`` parses the format string again
    on every call, most of the cost of formatting a line. Only validated field names go into the
    generated source; literal text and format specs are passed in as variables, so no
    text of the format string is ever compiled.
    """
    values: dict[str, Any] = {}
    parts = []
    try:
        for index, (literal, name, spec, conversion) in enumerate(_parse(fmt)):
            if literal:
                values[f"_t{index}"] = literal
                parts.append(f"{{_t{index}}}")
            if name is None:
                continue
            if not name.isidentifier() or conversion not in (None, "r", "s", "a"):
                return None
            if spec and not _PLAIN_SPEC.fullmatch(spec):
                return None
            field = f"e[{name!r}]" + (f"!{conversion}" if conversion else "")
            if spec:
                values[f"_s{index}"] = spec
                field += f":{{_s{index}}}"
            parts.append(f"{{{field}}}")
    except ValueError:
        return None  # malformed: Twisted's formatter says so in the line
    render: _Render = eval(f'lambda e: f"{"".join(parts)}"', values)
    return render


def _twisted_line(event: dict[str, Any]) -> str | None:
    return formatEventAsClassicLogText(event, formatTime=formatTime)


@implementer(ILogObserver)
class FastTextObserver:
    """Writes events as twistd's classic text lines, batched over ``FLUSH_DELAY``."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._renders: dict[str, _Render | None] = {}
        #: "namespace#level" for each (namespace, level) seen: the [system] of a line
        self._systems: dict[tuple[Any, Any], str] = {}
        self._second: int | None = None
        self._stamp = "-"
        self._pending: list[str] = []
        # Reentrant: Twisted logs from its signal handlers ("Received SIGTERM"), which run
        # in the main thread between any two bytecodes, possibly inside our own lock.
        self._lock = threading.RLock()
        self._flushing = False
        self._scheduled = False
        self._shutdown_hooked = False
        atexit.register(self.flush)

    # -- formatting -----------------------------------------------------------------------
    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when // 1)
        if second != self._second:
            self._stamp = formatTime(float(second))
            self._second = second
        return self._stamp

    def _system(self, namespace: Any, level: Any) -> str:
        """twistd's ``namespace#level`` for a line's [system], made once per pair."""
        try:
            return self._systems[(namespace, level)]
        except KeyError:
            system = f"{namespace}#{level.name if level else '-'}"
            if len(self._systems) < 4096:
                self._systems[(namespace, level)] = system
            return system
        except TypeError:  # an unhashable field: not worth remembering
            return f"{namespace}#{level.name if level else '-'}"

    def format(self, event: dict[str, Any]) -> str | None:
        """The line twistd's text observer would write for ``event`` (None: no line)."""
        fmt = event.get("log_format")
        if fmt is None or not isinstance(fmt, str):
            return _twisted_line(event)
        if "log_failure" in event or "log_flattened" in event:
            return _twisted_line(event)
        render = self._renders.get(fmt, _NOT_SEEN)
        if render is _NOT_SEEN:
            render = self._renders[fmt] = _compile(fmt) if len(self._renders) < 4096 else None
        if render is None:
            return _twisted_line(event)
        try:
            # Only plain {name}, {name!r}, {name:spec} fields are left here (see _compile):
            # for those, format_map's result -- what render() gives -- is exactly what
            # Twisted's formatter writes.
            text = render(event)
        except Exception:
            return _twisted_line(event)  # it writes "Unable to format event ..."
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            system = self._system(event.get("log_namespace", "-"), event.get("log_level"))
        when = event.get("log_time")
        # the stamp is made once per second (and for events without a time)
        stamp = self._time(when) if when is None or when // 1 != self._second else self._stamp
        line = f"{stamp} [{system}] {text}"
        if "\n" in line:
            line = line.replace("\n", "\n\t")
        return line + "\n"

    # -- writing --------------------------------------------------------------------------
    def __call__(self, event: dict[str, Any]) -> None:
        if not wanted(event):
            return  # Twisted's per-port lines, under loglevel info and above
        line = self.format(event)
        if not line:
            return
        with self._lock:
            self._pending.append(line)
            if self._scheduled and len(self._pending) < MAX_PENDING:
                return
            self._scheduled = True
        schedule = self._scheduler()
        if schedule is None or len(self._pending) >= MAX_PENDING:
            self.flush()
        else:
            schedule(self.flush)

    def _scheduler(self) -> Callable[[Callable[[], None]], Any] | None:
        """How to run the flush a little later (see FLUSH_DELAY); None: write now."""
        reactor = sys.modules.get("twisted.internet.reactor")
        if reactor is None or not getattr(reactor, "running", False):
            return None
        if not self._shutdown_hooked:
            self._shutdown_hooked = True
            reactor.addSystemEventTrigger("after", "shutdown", self.flush)
        if threadable.isInIOThread():
            return partial(reactor.callLater, FLUSH_DELAY)
        return reactor.callFromThread

    def flush(self) -> None:
        """Write every pending line now, in order, with one write() and one flush()."""
        with self._lock:
            if self._flushing:
                return  # a signal handler inside our own write: the loop below takes it
            self._flushing = True
            try:
                while self._pending:
                    lines, self._pending = self._pending, []
                    try:
                        self._out.write("".join(lines))
                        self._out.flush()
                    except (OSError, ValueError):
                        pass  # a closed or full log must not take the server down
            finally:
                self._flushing = False
                self._scheduled = False
