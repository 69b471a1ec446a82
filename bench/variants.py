"""Server variants named on the command line: worker processes and pinning.

``bench/run --servers qpconn-maildir-2w,qpconn-sink-1w-genpin,...`` names a qpconn
configuration (``sink`` or ``maildir``), optionally a number of worker processes
(``-Nw``: ``twistd qpconn --workers N``) and how it is pinned:

| suffix | server | load generator (smtp-source) |
|---|---|---|
| none (no ``-Nw``) | pinned to the first CPU | pinned to the second |
| none (with ``-Nw``) | not pinned | not pinned |
| ``-unpinned`` | not pinned | not pinned |
| ``-genpin`` | not pinned (its processes on every CPU) | pinned to the second CPU |

``-genpin`` is the fair multi-core case on a two-CPU machine: the workers may use both
CPUs, but the load generator's own CPU is fixed, so the kernel scheduler cannot put all the
load's work beside one worker and leave the other idle. The plain names without ``-Nw``
(``qpconn-sink``, ``qpconn-maildir``) stay the table's pinned one-process reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import servers
from servers import Launch, ServerSpec

__all__ = ["variant_spec", "VARIANT"]

#: qpconn-<config>[-<N>w][-unpinned|-genpin]
VARIANT = re.compile(
    r"^qpconn-(?P<config>sink|maildir)(?:-(?P<workers>\d+)w)?(?P<pin>-unpinned|-genpin)?$"
)

_CONFIGS: dict[str, tuple[str, Callable[[Path, int], Launch]]] = {
    "sink": ("qpconn sink", servers.qpconn_sink),
    "maildir": ("qpconn Maildir", servers.qpconn_maildir),
}


Prepare = Callable[[Path, int], Launch]


def with_workers(prepare: Prepare, count: int) -> Prepare:
    """``prepare``'s server with ``--workers count`` added."""

    def launch(workdir: Path, port: int) -> Launch:
        started = prepare(workdir, port)
        started.argv += ["--workers", str(count)]
        return started

    return launch


def variant_spec(name: str) -> ServerSpec | None:
    """The spec a variant name stands for; None for a name that is no variant (or one of
    the plain pinned names, which bench/run defines itself)."""
    match = VARIANT.match(name)
    if match is None or (match["workers"] is None and match["pin"] is None):
        return None
    label, prepare = _CONFIGS[match["config"]]
    workers = int(match["workers"]) if match["workers"] else 0
    if workers:
        if not servers.qpconn_supports_workers():
            return None
        prepare = with_workers(prepare, workers)
        label += f", {workers} worker{'s' if workers > 1 else ''}"
    else:
        label += ", 1 process"
    genpin = match["pin"] == "-genpin"
    label += ", load generator pinned" if genpin else ", unpinned"
    return ServerSpec(name, label, prepare, pinned=False, pin_load_generator=genpin)
