"""pytest fixtures that start a real ``twistd qpconn`` on a loopback port.

Enable them in a ``conftest.py``::

    pytest_plugins = ["qpconn.testing.pytest_plugin"]

then either override ``qpconn_config_dir`` and take ``qpconn_address``::

    @pytest.fixture
    def qpconn_config_dir(tmp_path):
        (tmp_path / "plugins").write_text("mycompany.nobounces\\nrcpt_ok\\nqueue/maildir md\\n")
        return tmp_path

    def test_bounces_are_refused(qpconn_address):
        with smtplib.SMTP(*qpconn_address) as smtp:
            assert smtp.mail("<>")[0] == 550

or call ``qpconn_start(config_dir, *options)`` for as many servers as a test needs; it
returns a :class:`QpconnProcess` (``address``, ``log()``, ``reload()``). Every server is
stopped when the test ends. The server is a separate process, exactly what runs in
production; its working directory is the test's ``tmp_path`` (so ``./maildir`` lands
there) and its log is ``tmp_path/qpconn-N.log``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["QpconnProcess", "start_qpconn", "qpconn_start", "qpconn_address", "qpconn_config_dir"]

_STARTUP_TIMEOUT = 30.0


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class QpconnProcess:
    """One ``twistd -n qpconn`` process listening on ``address``."""

    def __init__(self, process: subprocess.Popen[bytes], address: tuple[str, int], log: Path):
        self.process = process
        self.address = address
        self.log_path = log

    def log(self) -> str:
        """Everything the server has logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        """Block until ``text`` appears in the log (or fail after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log()}")

    def reload(self) -> None:
        """Ask the server to re-read its config directory (SIGHUP)."""
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not exited within 10 seconds; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return int(self.process.returncode)


def _connectable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=0.5):
            return True
    except OSError:
        return False


def start_qpconn(
    config_dir: str | os.PathLike[str] | None,
    *options: str,
    workdir: str | os.PathLike[str] = ".",
    host: str = "127.0.0.1",
    log_name: str = "qpconn.log",
) -> QpconnProcess:
    """Start ``twistd -n qpconn`` on a free port of ``host`` and wait until it accepts.

    ``options`` are more ``twistd qpconn`` options (``--hostname``, ``--metrics``...).
    A port taken by someone else between choosing and binding is retried.
    """
    log = Path(workdir) / log_name
    output_path = log.with_suffix(".out")
    failure = ""
    for _ in range(3):
        port = _free_port(host)
        kind, escaped = ("tcp6", host.replace(":", "\\:")) if ":" in host else ("tcp", host)
        listen = f"{kind}:{port}:interface={escaped}"
        command = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            f"--logfile={log}",
            "qpconn",
            "--listen",
            listen,
            "--no-rdns",
            *(["--config", os.fspath(config_dir)] if config_dir is not None else []),
            *options,
        ]
        with open(output_path, "wb") as output:  # start-up errors, before the log opens
            process = subprocess.Popen(
                command, cwd=workdir, stdout=output, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if _connectable((host, port)):
                return QpconnProcess(process, (host, port), log)
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        failure = output_path.read_text(errors="replace")
        failure += log.read_text(errors="replace") if log.exists() else ""
        if "Address already in use" not in failure:
            break
    raise RuntimeError(f"qpconn did not start:\n{failure}")


@pytest.fixture
def qpconn_start(tmp_path: Path) -> Iterator[Callable[..., QpconnProcess]]:
    """``qpconn_start(config_dir, *options)``: a running server; all stop at teardown."""
    started: list[QpconnProcess] = []

    def start(config_dir: Any, *options: str, **kwargs: Any) -> QpconnProcess:
        kwargs.setdefault("workdir", tmp_path)
        kwargs.setdefault("log_name", f"qpconn-{len(started) + 1}.log")
        server = start_qpconn(config_dir, *options, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def qpconn_config_dir() -> str | None:
    """The config directory ``qpconn_address`` uses; override it (None: built-in defaults)."""
    return None


@pytest.fixture
def qpconn_address(
    qpconn_start: Callable[..., QpconnProcess], qpconn_config_dir: Any
) -> tuple[str, int]:
    """(host, port) of a real qpconn serving ``qpconn_config_dir`` on loopback."""
    return qpconn_start(qpconn_config_dir).address
