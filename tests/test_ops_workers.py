"""``twistd qpconn --workers N``: worker processes sharing the listeners (qpconn.app.prefork).

Which worker served a message is read from what the server itself leaves behind: the
Maildir file name carries the pid of the process that stored it (``...P<pid>Q...``), and
that pid must be a child of the twistd process. To make "more than one worker served"
certain rather than likely, the worker that took the first session is paused with SIGSTOP
while the next sessions are sent: only another worker can accept them.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from qpconn.testing.pytest_plugin import qpconn_start  # noqa: F401 - the fixture
from tests.support.process import free_port

MAILDIR_PID = re.compile(r"P(\d+)Q")


def write(directory: Path, **files: str) -> None:
    for name, text in files.items():
        (directory / name).write_text(text)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    directory = tmp_path / "config"
    directory.mkdir()
    write(
        directory,
        me="mx.test\n",
        rcpthosts="mx.test\n",
        smtpgreeting="first set\n",
        plugins="rcpt_ok\nqueue/maildir ./store\n",
    )
    return directory


def wait_for_count(server, text: str, count: int, timeout: float = 30.0) -> str:
    """The log once ``text`` appears ``count`` times in it (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log()
        if log.count(text) >= count:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged {count} times in {timeout}s:\n{server.log()}")


def send(address: tuple[str, int], number: int) -> bytes:
    """One session with one message; the banner it got."""
    with smtplib.SMTP(timeout=30) as smtp:
        code, banner = smtp.connect(*address)
        assert code == 220
        smtp.sendmail("sender@example.org", ["user@mx.test"], f"Subject: {number}\r\n\r\nhi\r\n")
    return banner


def stored_pids(store: Path) -> list[int]:
    names = sorted(os.listdir(store / "new")) if (store / "new").is_dir() else []
    return [int(MAILDIR_PID.search(name).group(1)) for name in names]


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def paused(pid: int):
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def scrape(port: int) -> dict[str, float]:
    """Sum of every series of each metric name, from the parent's endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name = series.split("{", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def test_workers_share_the_listener_and_the_metrics_add_up_every_worker(
    qpconn_start, config, tmp_path  # noqa: F811
):
    metrics_port = free_port()
    server = qpconn_start(
        config, "--workers", "2", "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"
    )
    wait_for_count(server, " ready", 2)
    store = tmp_path / "store"

    send(server.address, 1)
    (first,) = stored_pids(store)
    with paused(first):  # only the other worker can accept now
        send(server.address, 2)
        send(server.address, 3)
    for number in (4, 5):
        send(server.address, number)

    pids = stored_pids(store)
    assert len(pids) == 5
    assert len(set(pids)) == 2, pids
    for pid in set(pids):
        assert pid != server.process.pid
        assert parent_of(pid) == server.process.pid
    # each worker's log events reach the parent's log, marked with the worker (a worker
    # and the parent each write their lines in batches, up to 50 ms later)
    log = wait_for_count(server, "accepted from=<sender@example.org>", 5)
    for pid in set(pids):
        assert re.search(rf"\[worker-{pid}\] .* accepted from=<sender@example\.org>", log), log
    # the parent says where it listens, and Twisted's line for its listener is not "_Unused"
    assert f"listening on tcp:127.0.0.1:{server.address[1]} for 2 workers" in log, log
    assert "_Unused" not in log, log

    figures = scrape(metrics_port)
    assert figures["qpconn_transactions_total"] == 5
    assert figures["qpconn_recipients_total"] == 5
    assert figures["qpconn_queue_outcomes_total"] == 5
    # start_qpconn's readiness probe is one more connection (opened and closed at once)
    assert figures["qpconn_connections_total"] == 6
    assert figures["qpconn_connections_open"] == 0
    assert figures["qpconn_received_bytes_total"] == 5 * len(b"Subject: 1\r\n\r\nhi\r\n")


def test_sighup_reaches_every_worker_a_dead_worker_is_replaced_sigterm_stops_all(
    qpconn_start, config, tmp_path  # noqa: F811
):
    server = qpconn_start(config, "--workers", "2")
    log = wait_for_count(server, " ready", 2)
    workers = [int(pid) for pid in re.findall(r"started worker (\d+)", log)]
    assert len(workers) == 2

    write(config, smtpgreeting="second set\n")
    server.reload()
    log = wait_for_count(server, "reloaded ", 2)
    for pid in workers:
        assert re.search(rf"\[worker-{pid}\] reloaded {re.escape(str(config))}", log), log
    # whichever worker answers, the new set greets
    one, other = workers
    with paused(one):
        assert send(server.address, 1).startswith(b"second set")
    with paused(other):
        assert send(server.address, 2).startswith(b"second set")

    os.kill(one, signal.SIGKILL)
    log = wait_for_count(server, " ready", 3)
    assert re.search(rf"worker {one} exited \(status None, signal 9\); restarting", log)
    replacement = int(re.findall(r"started worker (\d+)", log)[-1])
    assert replacement not in workers and parent_of(replacement) == server.process.pid
    with paused(other):  # only the replacement can answer, with the reloaded config
        assert send(server.address, 3).startswith(b"second set")

    # twistd ends by re-raising the signal it was stopped with, after a clean shutdown
    assert server.stop() == -signal.SIGTERM
    assert "Server Shut Down." in server.log()
    for pid in (other, replacement):
        assert not alive(pid), f"worker {pid} outlived its parent"
    assert f"worker {other} stopped" in server.log()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--workers", "0"], "--workers must be at least 1"),
        (["--workers", "2", "--listen", "ssl:4650:privateKey=x.pem"], "--workers shares"),
        (["--workers", "2", "--metrics", "nonsense:1"], "nonsense"),
    ],
    ids=["zero", "ssl-listener", "bad-metrics"],
)
def test_workers_usage_errors_start_nothing(tmp_path, options, message):
    command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
               "-n", "--pidfile=", "qpconn", "--no-rdns", *options]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert message in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
