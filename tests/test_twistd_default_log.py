"""``twistd qpconn`` without ``--logger``: twistd's text log, written by qpconn's observer.

The same file choices as twistd (``-n``: standard output; ``--logfile``; ``twistd.log``),
the same rotation (1 MB, ``SIGUSR1``); ``--logger`` and ``--syslog`` left to twistd.
The wiring is checked along twistd's own path (options parsed by ``ServerOptions``, the
service added to an ``Application``), and end to end with a real twistd.
"""

from __future__ import annotations

import os
import signal
import smtplib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.application import service
from twisted.logger import ILogObserver
from twisted.python.logfile import LogFile
from twisted.scripts.twistd import ServerOptions

from qpconn.log.fasttext import FastTextObserver
from qpconn.log.twistd import default_observer
from tests.support.process import free_port, running, twistd_command
from tests.support.server import write_config


@pytest.fixture(autouse=True)
def _keep_sigusr1() -> Iterator[None]:
    """A log file observer takes SIGUSR1 (as twistd does): give the test process its own back."""
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


def _config(tmp_path: Path) -> str:
    return write_config(
        str(tmp_path / "config"),
        {"plugins": ["rcpt_ok", "queue/discard"], "rcpthosts": "mx.test\n"},
    )


def _application(tmp_path: Path, *twistd_args: str) -> service.Application:
    """What twistd's createOrGetApplication builds for these arguments."""
    config = ServerOptions()
    qpconn_args = ["--listen", "tcp:0:interface=127.0.0.1", "--config", _config(tmp_path)]
    config.parseOptions([*twistd_args, "qpconn", *qpconn_args, "--no-rdns"])
    plugin = config.loadedPlugins[config.subCommand]
    application = service.Application(plugin.tapname)
    plugin.makeService(config.subOptions).setServiceParent(application)
    return application


def test_a_log_file_gets_qpconns_observer_on_a_rotating_logfile(tmp_path):
    path = tmp_path / "server.log"
    application = _application(tmp_path, "-n", "--logfile", str(path))
    observer = application.getComponent(ILogObserver)
    assert isinstance(observer, FastTextObserver)
    assert isinstance(observer._out, LogFile)
    assert Path(observer._out.path) == path


def test_nodaemon_without_logfile_logs_to_stdout(tmp_path):
    observer = _application(tmp_path, "-n").getComponent(ILogObserver)
    assert isinstance(observer, FastTextObserver)
    assert observer._out is sys.stdout


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("-n", "--logger=qpconn.log.observers.json_stdout"), id="logger"),
        pytest.param(("-n", "--syslog"), id="syslog"),
    ],
)
def test_logger_and_syslog_are_left_to_twistd(tmp_path, args):
    assert _application(tmp_path, *args).getComponent(ILogObserver) is None


def test_the_choices_twistd_makes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    daemon = default_observer({"logfile": None, "nodaemon": False})
    assert isinstance(daemon, FastTextObserver)
    assert Path(daemon._out.path) == tmp_path / "twistd.log"
    # twistd refuses a daemon logging to stdout with its own message: leave it to it
    assert default_observer({"logfile": "-", "nodaemon": False}) is None
    assert default_observer({"logfile": "-", "nodaemon": True})._out is sys.stdout
    assert default_observer(None) is None  # not under twistd


def test_the_service_reaches_through_to_the_wrapped_one(tmp_path):
    application = _application(tmp_path, "-n", "--logfile", str(tmp_path / "x.log"))
    (top,) = list(service.IServiceCollection(application))
    assert top.factory is top.inner.factory


def test_real_twistd_writes_its_log_file_and_rotates_on_sigusr1(tmp_path):
    port = free_port()
    log = tmp_path / "qpconn.log"
    command = twistd_command(
        "--logfile",
        str(log),
        "qpconn",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--config",
        _config(tmp_path),
        "--no-rdns",
    )
    with running(command, port, str(tmp_path)) as process:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.sendmail("a@example.org", ["u@mx.test"], "Subject: one\r\n\r\nhi\r\n")
        process.send_signal(signal.SIGUSR1)
        rotated = tmp_path / "qpconn.log.1"
        deadline = time.monotonic() + 10
        while not rotated.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rotated.exists()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.sendmail("b@example.org", ["u@mx.test"], "Subject: two\r\n\r\nhi\r\n")
    before, after = rotated.read_text(), log.read_text()
    assert " accepted from=<a@example.org> " in before
    assert " accepted from=<b@example.org> " in after
    assert " accepted from=<b@example.org> " not in before
    assert after.splitlines()[-1].endswith("Server Shut Down.")
    assert os.stat(log).st_size > 0
