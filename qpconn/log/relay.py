"""Log events from ``--workers`` processes to their parent, cheaply, in batches.

A worker writes its log events on standard output; the parent reads them and publishes
them again in its own log (:mod:`qpconn.app.prefork`). Twisted's JSON form
(``eventAsJSON``/``eventFromJSON``) keeps anything an event may hold, but flattens every
format field and walks every object on both sides: about 50 µs per event, more than a
third of what the whole SMTP transaction costs the worker, so a server with two workers
was slower than one.

Most events are flat: a format string and fields that are ``str``, ``int``, ``float``,
``bool`` or None. Those go as plain JSON objects, which round-trip exactly (so the parent
formats the very same text), with the level by name; they start with ``\\x1f`` instead
of Twisted's ``\\x1e``. Anything else -- a failure with its traceback, a field holding a
tuple or an object -- goes Twisted's way, as before. The worker writes its records in
batches, one ``write()`` per 50 ms at most (:class:`qpconn.log.fasttext.FastTextObserver`'s).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import InvalidLogLevelError, LogLevel, eventAsJSON, eventFromJSON

from qpconn.log.fasttext import FastTextObserver

__all__ = ["RelayObserver", "decode"]

#: starts a plain JSON record; Twisted's records start with "\x1e"
PLAIN = "\x1f"
_PLAIN_BYTES = PLAIN.encode()
_FLAT = (str, int, float, bool, type(None))
#: fields of a live event that do not travel (objects of the worker's process)
_LEVEL_NAMES = {level: level.name for level in LogLevel.iterconstants()}
_LOCAL = frozenset({"log_logger", "log_source", "log_level", "log_trace", "log_observer"})


def encode(event: dict[str, Any]) -> str:
    """One record (without its newline) for ``event``: plain JSON when that is exact."""
    level = _LEVEL_NAMES.get(event.get("log_level"))  # type: ignore[arg-type]
    if level is not None and "log_failure" not in event:
        record: dict[str, Any] = {}
        for key, value in event.items():
            if key in _LOCAL:
                continue
            if type(value) not in _FLAT:
                break  # not exactly representable: Twisted's form below
            record[key] = value
        else:
            record["log_level"] = level
            return PLAIN + json.dumps(record, ensure_ascii=False)
    return "\x1e" + eventAsJSON(event)


def decode(record: bytes) -> dict[str, Any] | None:
    """The event of one record from a worker; None for a blank one. ValueError if garbled."""
    if record.startswith(_PLAIN_BYTES):
        event = json.loads(record[1:].decode("utf-8", "replace"))
        if not isinstance(event, dict):
            raise ValueError("not a log record")
        try:
            event["log_level"] = LogLevel.levelWithName(event["log_level"])
        except (KeyError, InvalidLogLevelError) as exc:
            raise ValueError("log record without a valid level") from exc
        return event
    text = record.decode("utf-8", "replace").strip("\x1e \r\n")
    if not text:
        return None
    return eventFromJSON(text)


class RelayObserver(FastTextObserver):
    """Writes each event as one record line, batched as FastTextObserver batches."""

    def format(self, event: dict[str, Any]) -> str | None:
        return encode(event) + "\n"
