"""Privileged ports: twistd's --uid/--gid after binding as root, and systemd socket activation
with the example unit in docs/examples."""

from __future__ import annotations

import os
import shlex
import shutil
import smtplib
import socket
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.process import (
    free_port,
    logged_process,
    running,
    twistd_command,
    wait_for_port,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "docs" / "examples"
NOBODY = 65534


def open_to_others(path: str) -> bool:
    """Every directory up to ``path`` may be entered by any user (o+x)."""
    current = os.path.abspath(path)
    while True:
        if not os.stat(current).st_mode & 0o001:
            return False
        parent = os.path.dirname(current)
        if parent == current:
            return True
        current = parent


def python_for_nobody() -> tuple[str, dict[str, str]]:
    """An interpreter whose standard library the unprivileged user can read, and the
    environment that gives it this checkout and its dependencies.

    A server that has dropped privileges still imports modules lazily, so its Python must
    be readable by the user it runs as (a pyenv under /root is not).
    """
    site = sysconfig.get_paths()["purelib"]
    if not open_to_others(site):
        pytest.skip(f"{site} is not readable by an unprivileged user")
    if open_to_others(sysconfig.get_paths()["stdlib"]):
        return sys.executable, {}
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidate = f"/usr/bin/python{version}"
    stdlib = f"/usr/lib/python{version}"
    if os.path.exists(candidate) and os.path.isdir(stdlib) and open_to_others(stdlib):
        return candidate, {"PYTHONPATH": os.pathsep.join([str(REPO), site])}
    pytest.skip("no Python whose standard library an unprivileged user can read")


def privileged_port() -> int:
    """A free port below 1024 on 127.0.0.1 (25 if it is free)."""
    for port in (25, 587, 465, *range(900, 940)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free privileged port on 127.0.0.1")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="qpconn-privileges-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a privileged port needs root")
def test_root_binds_a_privileged_port_then_runs_as_nobody(shared_dir):
    python, env = python_for_nobody()
    maildir = shared_dir / "maildir"
    for sub in ("", "tmp", "new", "cur"):  # made beforehand, owned by the server's user
        (maildir / sub).mkdir(exist_ok=True)
        os.chown(maildir / sub, NOBODY, NOBODY)
    config = shared_dir / "config"
    config.mkdir()
    (config / "plugins").write_text(f"rcpt_ok\nqueue/maildir {maildir}\n")
    (config / "rcpthosts").write_text("mx.test\n")
    port = privileged_port()
    command = [
        python,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        f"--uid={NOBODY}",
        f"--gid={NOBODY}",
        "qpconn",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--config",
        str(config),
        "--no-rdns",
    ]
    with running(command, port, str(shared_dir), env) as process:
        # twistd listens first (as root: the port is privileged), then switches user; a
        # loaded machine can accept a connection in between, so wait for the switch.
        deadline = time.monotonic() + 60
        while True:
            status = Path(f"/proc/{process.pid}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            uids, gids = fields["Uid"].split(), fields["Gid"].split()
            if uids == [str(NOBODY)] * 4 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert uids == [str(NOBODY)] * 4, status
        assert gids == [str(NOBODY)] * 4, status
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            assert smtp.sendmail("a@example.org", ["u@mx.test"], b"Subject: p\r\n\r\nx\r\n") == {}
    (stored,) = (maildir / "new").iterdir()
    assert stored.stat().st_uid == NOBODY
    assert b"Subject: p" in stored.read_bytes()


def example_exec_start() -> list[str]:
    """The qpconn options of ExecStart in docs/examples/qpconn.service."""
    text = (EXAMPLES / "qpconn.service").read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    words = shlex.split(line.removeprefix("ExecStart="))
    assert words[0].endswith("/twistd")
    return words[words.index("qpconn") + 1 :]


def test_socket_activation_with_the_example_unit(tmp_path):
    socket_unit = (EXAMPLES / "qpconn.socket").read_text()
    assert "ListenStream=25" in socket_unit and "BindIPv6Only=both" in socket_unit
    options = example_exec_start()
    assert options[options.index("--listen") + 1] == "systemd:domain=INET6:index=0"
    config = tmp_path / "config"
    config.mkdir()
    (config / "plugins").write_text(f"rcpt_ok\nqueue/maildir {tmp_path / 'maildir'}\n")
    (config / "rcpthosts").write_text("mx.test\n")
    metrics_port = free_port()
    options[options.index("--config") + 1] = str(config)
    options[options.index("--metrics") + 1] = f"tcp:{metrics_port}:interface=127.0.0.1"

    # What systemd does for qpconn.socket: an IPv6 socket that also takes IPv4, passed as
    # fd 3 with LISTEN_PID/LISTEN_FDS naming the process that execs twistd.
    listener = socket.socket(socket.AF_INET6)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    activate = (
        "import os, sys; os.dup2(int(os.environ['QPCONN_FD']), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', "
        "LISTEN_FDNAMES='qpconn.socket'); "
        "os.execvp(sys.argv[1], sys.argv[1:])"
    )
    command = [sys.executable, "-c", activate, *twistd_command("qpconn", *options, "--no-rdns")]
    fd = listener.fileno()
    with logged_process(command, str(tmp_path), {"QPCONN_FD": str(fd)}, pass_fds=(fd,)) as process:
        listener.close()  # the server owns it now
        wait_for_port(metrics_port, process)
        for host in ("127.0.0.1", "::1"):
            with smtplib.SMTP(host, port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                refused = smtp.sendmail("a@example.org", ["u@mx.test"], b"Subject: s\r\n\r\nx\r\n")
                assert refused == {}
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 2
    text = (tmp_path / "server.log").read_text()
    assert "connect from 127.0.0.1:" in text  # IPv4-mapped clients are logged as IPv4
    assert "connect from ::1:" in text
