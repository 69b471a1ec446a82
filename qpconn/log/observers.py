"""Log observers for ``twistd --logger``: JSON lines an aggregator can ingest.

Every qpconn log event is structured (``twisted.logger`` fields): the session events
carry ``conn_id``, ``txn_id`` and ``remote_ip``; refusals and the per-transaction summary
add ``event``, ``hook``, ``plugin`` and ``result``. A text log shows only the formatted
message; these observers keep every field::

    twistd -n --logger=qpconn.log.observers.json_stdout qpconn ...
    QPCONN_JSON_LOG=/var/log/qpconn/events.json \
        twistd --logger=qpconn.log.observers.json_file qpconn ...

One JSON object per line (``jsonFileLogObserver`` with a newline as the only record
separator), which ``jq``, Vector, Fluent Bit or Loki's promtail read as they are.

``fast_text`` writes twistd's usual text lines, for a fraction of the CPU
(:mod:`qpconn.log.fasttext`)::

    QPCONN_TEXT_LOG=/var/log/qpconn/qpconn.log \
        twistd --logger=qpconn.log.observers.fast_text qpconn ...
"""

from __future__ import annotations

import os
import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    PredicateResult,
    jsonFileLogObserver,
)

from qpconn.log.fasttext import FastTextObserver
from qpconn.log.level import wanted

__all__ = ["json_stdout", "json_file", "fast_text"]


def _wanted(event: dict) -> PredicateResult:
    return PredicateResult.maybe if wanted(event) else PredicateResult.no


def json_stdout() -> ILogObserver:
    """Every event as one JSON line on standard output (systemd's journal, containers);
    Twisted's per-port lines only under ``loglevel debug`` (qpconn.log.level.wanted)."""
    return FilteringLogObserver(jsonFileLogObserver(sys.stdout, recordSeparator=""), [_wanted])


def json_file() -> ILogObserver:
    """Every event as one JSON line appended to ``$QPCONN_JSON_LOG`` (default
    ``qpconn.json`` in the working directory), filtered as :func:`json_stdout`."""
    path = os.environ.get("QPCONN_JSON_LOG") or "qpconn.json"
    out = open(path, "a", encoding="utf-8")  # noqa: SIM115 - the observer's for good
    return FilteringLogObserver(jsonFileLogObserver(out, recordSeparator=""), [_wanted])


def fast_text() -> ILogObserver:
    """twistd's text lines, formatted cheaply and written once per reactor turn, appended
    to ``$QPCONN_TEXT_LOG`` (standard output when it is unset or ``-``)."""
    path = os.environ.get("QPCONN_TEXT_LOG") or "-"
    out = sys.stdout if path == "-" else open(path, "a", encoding="utf-8")  # noqa: SIM115
    return FastTextObserver(out)
