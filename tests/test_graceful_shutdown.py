"""SIGTERM to ``twistd -n qpconn``: stop accepting, finish messages in flight, 421 the rest.

The server is a real separate process; the clients are raw sockets, one idle after EHLO
and one halfway through its message text when the signal arrives.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e_client import Client, ConnectionClosed
from tests.support.process import free_port, twistd_command, wait_for_port
from tests.support.timing import assert_within_timeout


def start(tmp_path: Path, grace: str) -> tuple[subprocess.Popen[bytes], int]:
    config = tmp_path / "config"
    config.mkdir()
    (config / "me").write_text("mx.test\n")
    (config / "rcpthosts").write_text("localhost\n")
    (config / "plugins").write_text(f"rcpt_ok\nqueue/maildir {tmp_path / 'maildir'}\n")
    (config / "shutdown_timeout").write_text(f"{grace}\n")
    port = free_port()
    command = twistd_command(
        "qpconn", "--listen", f"tcp:{port}:interface=127.0.0.1", "--config", str(config),
        "--no-rdns",
    )  # fmt: skip
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - the child keeps it
    process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_for_port(port, process)
    return process, port


@pytest.fixture
def reaper() -> list[subprocess.Popen[bytes]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)


def in_data(port: int) -> Client:
    client = Client(("127.0.0.1", port), timeout=10)
    assert client.cmd("EHLO client.test").code == 250
    assert client.cmd("MAIL FROM:<a@example.org>").code == 250
    assert client.cmd("RCPT TO:<user@localhost>").code == 250
    assert client.cmd("DATA").code == 354
    client.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    return client


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return sock.recv(100) == b""
    except OSError:
        return True


def test_message_in_flight_finishes_and_idle_sessions_get_421(tmp_path, reaper):
    process, port = start(tmp_path, "20")
    reaper.append(process)
    sending = in_data(port)
    idle = Client(("127.0.0.1", port), timeout=10)
    assert idle.cmd("EHLO idle.test").code == 250
    # Both sessions are established server-side: each has had its answer (354, 250). Bytes
    # of the message still in flight are read after the signal like any others.
    process.send_signal(signal.SIGTERM)
    # The idle session is told at once, and closed.
    reply = idle.reply()
    assert reply.code == 421 and reply.text == "4.3.2 mx.test Service shutting down"
    assert idle.is_closed()
    # No new sessions are accepted...
    assert refused(port)
    # ...but the message being sent is still taken, stored, and acknowledged.
    reply = sending.message(b"second half")
    assert reply.code == 250, reply
    after = sending.reply()
    assert after.code == 421
    assert sending.is_closed()
    assert process.wait(timeout=10) in (0, -signal.SIGTERM)  # twistd re-raises the signal
    (name,) = os.listdir(tmp_path / "maildir" / "new")
    stored = (tmp_path / "maildir" / "new" / name).read_bytes()
    assert stored.endswith(b"\n\nfirst half\nsecond half\n")


def test_grace_period_ends_with_421_and_nothing_stored(tmp_path, reaper):
    process, port = start(tmp_path, "1")
    reaper.append(process)
    sending = in_data(port)  # in DATA once the 354 came
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    reply = sending.reply()  # the client never finishes its message
    waited = time.monotonic() - began
    assert reply.code == 421
    # the 1 s grace period, not the 30 s shutdown_timeout default
    assert_within_timeout(waited, fired=1.0, instead_of=30)
    with pytest.raises((ConnectionClosed, OSError)):
        sending.cmd("NOOP")
    assert process.wait(timeout=10) in (0, -signal.SIGTERM)  # twistd re-raises the signal
    assert os.listdir(tmp_path / "maildir" / "new") == []
