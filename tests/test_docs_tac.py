"""docs/examples/qpconn.tac under a real ``twistd -n -y``, as docs/running.md describes it."""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TAC = REPO / "docs" / "examples" / "qpconn.tac"
START_TIMEOUT = 30.0


def twistd() -> list[str]:
    """The twistd of this interpreter's environment (``python -m twisted`` is ``twist``)."""
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"twistd exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(
        f"nothing listened on port {port} within {START_TIMEOUT}s:\n{log.read_text()}"
    )


@contextmanager
def running_twistd(
    args: Sequence[str], port: int, cwd: Path, env: Mapping[str, str] | None = None
) -> Iterator[Path]:
    """Run ``twistd -n ... ARGS`` logging to stdout; yield the log file; always stop it."""
    log = cwd / "twistd.out"
    environment = {**os.environ, **(env or {})}
    # The docs examples are imported as docs.examples.*, from the repository root.
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), environment.get("PYTHONPATH")])
    )
    command = [*twistd(), "-n", "--pidfile=", "--logfile=-", *args]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=environment, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            wait_for_port(port, process, log)
            yield log
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


def send(port: int, rcpt: str, subject: str = "from the test") -> tuple[int, bytes]:
    """One message; returns the EHLO reply so callers can check the server's name."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        ehlo = smtp.ehlo("client.test")
        assert (
            smtp.sendmail("sender@example.org", [rcpt], f"Subject: {subject}\r\n\r\nhi\r\n") == {}
        )
        return ehlo


def delivered(maildir: Path) -> list[bytes]:
    """The messages in maildir/new (the 250 came after the rename, so no wait is needed)."""
    new = maildir / "new"
    return [path.read_bytes() for path in sorted(new.iterdir())] if new.is_dir() else []


def wait_for_log(log: Path, text: str, timeout: float = 5.0) -> str:
    """The log once it contains ``text`` (log lines may trail the SMTP reply)."""
    deadline = time.monotonic() + timeout
    while True:
        content = log.read_text(errors="replace")
        if text in content or time.monotonic() > deadline:
            return content
        time.sleep(0.05)


def test_tac_file_serves_mail_into_the_maildir_from_the_environment(tmp_path):
    port = free_port()
    maildir = tmp_path / "mail"
    env = {
        "QPCONN_LISTEN": f"tcp:{port}:interface=127.0.0.1",
        "QPCONN_MAILDIR": str(maildir),
        "QPCONN_HOSTNAME": "mx.tac.test",
    }
    with running_twistd(["-y", str(TAC)], port, tmp_path, env) as log:
        ehlo = send(port, "user@mx.tac.test")
        assert ehlo[0] == 250 and ehlo[1].startswith(b"mx.tac.test Hi ")
        (message,) = delivered(maildir)
        assert b"Delivered-To: user@mx.tac.test\n" in message
        assert b"Subject: from the test\n" in message
        content = wait_for_log(log, " disconnect")
    assert " connect from 127.0.0.1:" in content
    assert " accepted from=<sender@example.org> to=<user@mx.tac.test> " in content
    assert " disconnect" in content
    assert not (tmp_path / "maildir").exists()  # QPCONN_MAILDIR replaced ./maildir


def test_tac_file_with_a_config_directory_and_protocol_subclass(tmp_path):
    """docs/protocol.md's QPCONN_COMMANDS command, with a config directory and a free port."""
    port = free_port()
    config = tmp_path / "config"
    config.mkdir()
    maildir = tmp_path / "per-domain" / "%d"
    (config / "me").write_text("mx.conf.test\n")
    (config / "rcpthosts").write_text("# our domains\nexample.net\n")
    (config / "plugins").write_text(f"rcpt_ok\nqueue/maildir {maildir}\n")
    env = {
        "QPCONN_LISTEN": f"tcp:{port}:interface=127.0.0.1",
        "QPCONN_CONFIG": str(config),
        "QPCONN_COMMANDS": "docs.examples.custom_commands:StatsCommands",
    }
    with running_twistd(["-y", str(TAC)], port, tmp_path, env):
        with smtplib.SMTP(timeout=10) as smtp:
            greeting = smtp.connect("127.0.0.1", port)
            smtp.ehlo("client.test")
            assert smtp.has_extn("xstats")
            smtp.sendmail("a@example.org", ["someone@example.net"], b"Subject: x\r\n\r\nhi\r\n")
        assert greeting == (220, b"mx.conf.test ESMTP Example Mail Service; no unsolicited mail")
        assert len(delivered(tmp_path / "per-domain" / "example.net")) == 1
