"""A real ``redis-server`` on a free loopback port, started by the test that needs it.

Nothing is written to disk (``--save ''``, ``--appendonly no``); the server is stopped
when the test ends. Tests skip cleanly when Debian's ``redis-server`` is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.process import free_port, stop, wait_for_port


def redis_binary() -> str | None:
    """Path of ``redis-server``, or None when it is not installed."""
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


@contextmanager
def redis_server(directory: str, port: int | None = None) -> Iterator[str]:
    """Run redis-server on 127.0.0.1 (on ``port``, else a free one); yields its URL."""
    binary = redis_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = port or free_port()
    log = open(os.path.join(directory, f"redis-{port}.log"), "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", directory, "--daemonize", "no"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_port(port, process, timeout=10.0)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process, grace=5.0)
        log.close()
