"""Log observers for ``twistd --logger``: JSON lines an aggregator can ingest.

Every qpconn log event is structured (``twisted.logger`` fields): the session events
carry ``conn_id``, ``txn_id`` and ``remote_ip``; refusals and the per-transaction summary
add ``event``, ``hook``, ``plugin`` and ``result``. A text log shows only the formatted
message; these observers keep every field::

    twistd -n --logger=qpconn.logs.json_stdout qpconn ...
    QPCONN_JSON_LOG=/var/log/qpconn/events.json twistd --logger=qpconn.logs.json_file qpconn ...

One JSON object per line (``jsonFileLogObserver`` with a newline as the only record
separator), which ``jq``, Vector, Fluent Bit or Loki's promtail read as they are.
"""

from __future__ import annotations

import os
import sys

from twisted.logger import ILogObserver, jsonFileLogObserver

__all__ = ["json_stdout", "json_file"]


def json_stdout() -> ILogObserver:
    """Every event as one JSON line on standard output (systemd's journal, containers)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


def json_file() -> ILogObserver:
    """Every event as one JSON line appended to ``$QPCONN_JSON_LOG`` (default
    ``qpconn.json`` in the working directory)."""
    path = os.environ.get("QPCONN_JSON_LOG") or "qpconn.json"
    return jsonFileLogObserver(open(path, "a", encoding="utf-8"), recordSeparator="")
