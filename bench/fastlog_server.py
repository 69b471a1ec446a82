"""The qpconn sink configuration logging through ``qpconn.log.observers.fast_text``.

Same server, plugins and log lines as ``servers.qpconn_sink`` (twistd's default text log
to ``--logfile``); only the observer differs: ``twistd --logger=qpconn.log.observers.fast_text``
with ``QPCONN_TEXT_LOG`` naming the same file. The table shows both, so what the log
observer costs is visible beside everything else.
"""

from __future__ import annotations

from pathlib import Path

import servers

LOGGER = "qpconn.log.observers.fast_text"


def qpconn_sink_fastlog(workdir: Path, port: int) -> servers.Launch:
    launch = servers.qpconn_sink(workdir, port)
    argv = launch.argv
    at = argv.index("--logfile")
    logfile = argv[at + 1]
    launch.argv = [*argv[:at], f"--logger={LOGGER}", *argv[at + 2 :]]
    launch.env["QPCONN_TEXT_LOG"] = logfile
    return launch
