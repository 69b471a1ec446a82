"""What the hostile workload's two client roles share (``hostile_clients.py attack``,
``hostile_probe.py``): the addresses, the harness's stdout protocol, the ways to be told
to stop, and reading one SMTP reply.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
from typing import Any

HOST = "127.0.0.1"
HOSTNAME = "bench.test"
RECIPIENT = f"user@{HOSTNAME}"


def cpu_seconds() -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": usage.ru_utime, "system": usage.ru_stime}


def emit(tag: str, payload: dict[str, Any]) -> None:
    """One line on stdout for the harness: ``<tag> <json>``."""
    sys.stdout.write(f"{tag} {json.dumps(payload)}\n")
    sys.stdout.flush()


def install_stop(stop: asyncio.Event, max_seconds: float) -> None:
    """Every way this process is told to stop sets ``stop``: stdin, signals, the parent's
    death (the harness killed hard leaves no attackers behind), the deadline."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def on_stdin() -> None:
        try:
            os.read(sys.stdin.fileno(), 4096)
        except OSError:
            pass
        # Any line, or EOF (the harness went away), means stop.
        loop.remove_reader(sys.stdin.fileno())
        stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    loop.call_later(max_seconds, stop.set)
    parent = os.getppid()

    def watch_parent() -> None:
        if os.getppid() != parent:
            stop.set()
        else:
            loop.call_later(1.0, watch_parent)

    loop.call_later(1.0, watch_parent)


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """The last line of one (possibly multi-line) SMTP reply."""
    for _ in range(1000):  # a reply of more lines than this is not SMTP
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by the server")
        if line[3:4] != b"-":
            return line
    raise ConnectionError("endless reply")
