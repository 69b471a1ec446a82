"""Run qpconn as a separate process, the way an administrator starts it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ipv6_loopback() -> bool:
    """Whether this machine can listen on ::1 (containers often have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Block until something accepts on 127.0.0.1:port (or the process died, or time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM a still-running ``process``, then SIGKILL it if it is not gone after ``grace``.

    Bounded either way, so a wedged server cannot hang the test run.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def twistd_command(*args: str) -> list[str]:
    """``twistd`` from the running interpreter's environment, in the foreground, no pidfile."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.path.exists(script):
        return [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            *args,
        ]
    return [script, "--nodaemon", "--pidfile=", *args]


@contextmanager
def logged_process(
    command: Sequence[str], cwd: str, env: dict[str, str] | None = None, **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``command`` in ``cwd`` and always stop it afterwards (see :func:`stop`).

    Its output goes to ``cwd/server.log`` (for assertions and failure reports); ``env``
    is added to ours; ``popen`` passes on (``pass_fds``, ``preexec_fn``...).
    """
    log = open(os.path.join(cwd, "server.log"), "wb")  # noqa: SIM115 - closed in finally
    try:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            **popen,
        )
        try:
            yield process
        finally:
            stop(process)
    finally:
        log.close()


@contextmanager
def running(
    command: Sequence[str], port: int, cwd: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``command``, wait for its port, and always stop it afterwards."""
    with logged_process(command, cwd, env) as process:
        wait_for_port(port, process)
        yield process
