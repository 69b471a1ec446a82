"""kill -9 at random moments never loses an acknowledged message nor shows a partial one.

``twistd -n qpconn`` runs as a real separate process storing into a Maildir. Two client
threads send messages in a loop, each with its own id (in a header field and in every
body line, so a truncated or mixed-up file is recognised). The server is killed with
SIGKILL at random points, a bounded number of times, and restarted on the same port.
After every kill, and at the end, the Maildir's ``new/`` must hold only complete
messages; at the end every message the client saw a 250 for must be there exactly once,
and the spool directory must be empty (stale files of the killed processes are removed
at the next start, the last process's own at its end).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.e2e_client import Client
from tests.support.nexthop import aiosmtpd_next_hop
from tests.support.process import free_port, twistd_command, wait_for_port
from tests.support.process import stop as stop_process

KILLS = 5
SENDERS = 2


def message(ident: str) -> bytes:
    """The message text for ``ident``; every third one is large enough to spool."""
    lines = 1200 if int(ident.rsplit("-", 1)[1]) % 3 == 0 else 20
    body = b"".join(b"%s line %05d\r\n" % (ident.encode(), i) for i in range(lines))
    return b"Subject: crash test\r\nX-Id: %s\r\n\r\n%s" % (ident.encode(), body)


def check_new(new: Path) -> Counter[str]:
    """Every file in new/ is one whole message; returns how often each id is there."""
    seen: Counter[str] = Counter()
    for name in os.listdir(new):
        data = (new / name).read_bytes()
        head, _, _ = data.partition(b"\r\n\r\n")
        (field,) = [line for line in head.split(b"\r\n") if line.startswith(b"X-Id: ")]
        ident = field[6:].decode()
        expected = message(ident)
        assert data.endswith(expected.split(b"\r\n", 1)[1]), f"partial file {name}"
        seen[ident] += 1
    return seen


class Sender(threading.Thread):
    """Sends messages until stopped; remembers which ids got a 250 after DATA."""

    def __init__(self, number: int, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.number, self.port, self.stop = number, port, stop
        self.acked: list[str] = []
        self.unknown = 0  # the connection died between the message and its reply
        self.sent = 0

    def run(self) -> None:
        while not self.stop.is_set() and self.sent < 2000:
            try:
                client = Client(("127.0.0.1", self.port), timeout=5)
            except OSError:
                time.sleep(0.02)
                continue
            try:
                self.session(client)
            except (OSError, AssertionError, Exception):
                pass
            finally:
                client.close()

    def session(self, client: Client) -> None:
        assert client.cmd("EHLO client.test").code == 250
        for _ in range(50):
            if self.stop.is_set():
                return
            ident = f"s{self.number}-{self.sent}"
            self.sent += 1
            assert client.cmd("MAIL FROM:<a@example.org>").code == 250
            assert client.cmd("RCPT TO:<user@localhost>").code == 250
            assert client.cmd("DATA").code == 354
            client.send(message(ident) + b".\r\n")
            try:
                reply = client.reply()
            except Exception:
                self.unknown += 1
                raise
            if reply.code == 250:
                self.acked.append(ident)


def crash_loop(tmp_path: Path, queue_line: str, check: Callable[[], object]) -> list[Sender]:
    """Run the server with ``queue_line``, kill it KILLS times while two clients send,
    calling ``check`` after each kill; return the senders (their acknowledged ids)."""
    rng = random.Random(int(os.environ.get("QPCONN_CRASH_SEED", time.time_ns() % 10**6)))
    config, spool = tmp_path / "config", tmp_path / "spool"
    config.mkdir()
    spool.mkdir()
    (config / "me").write_text("mx.test\n")
    (config / "rcpthosts").write_text("localhost\n")
    (config / "plugins").write_text(f"rcpt_ok\n{queue_line}\n")
    (config / "spool_dir").write_text(f"{spool}\n")
    (config / "size_threshold").write_text("8192\n")
    port = free_port()
    command = twistd_command(
        "qpconn", "--listen", f"tcp:{port}:interface=127.0.0.1", "--config", str(config),
        "--no-rdns",
    )  # fmt: skip
    log = open(tmp_path / "server.log", "ab")  # noqa: SIM115 - closed below
    stop = threading.Event()
    senders = [Sender(n, port, stop) for n in range(SENDERS)]

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(port, process)
        return process

    process = start()
    try:
        for sender in senders:
            sender.start()
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.3, 1.0))
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            check()
            process = start()
        time.sleep(0.5)
        stop.set()
        for sender in senders:
            sender.join(10)
            assert not sender.is_alive()
    finally:
        stop.set()
        stop_process(process)
        log.close()
    # Stale spool files of the killed processes went at the next start, the last
    # process's own with their transactions.
    assert os.listdir(spool) == []
    return senders


def test_kill_9_never_loses_an_acknowledged_message(tmp_path):
    maildir = tmp_path / "maildir"
    new = maildir / "new"
    senders = crash_loop(
        tmp_path,
        f"queue/maildir {maildir}",
        lambda: new.exists() and check_new(new),  # nothing partial, even right after a kill
    )
    seen = check_new(new)
    acked = [ident for sender in senders for ident in sender.acked]
    missing = [ident for ident in acked if seen[ident] != 1]
    assert missing == [], f"acknowledged but missing or duplicated: {missing[:10]}"
    assert all(count == 1 for count in seen.values())
    assert len(acked) >= 20, f"too few messages to mean anything: {len(acked)}"
    print(  # the figures, for the report (pytest -s)
        f"sent={sum(s.sent for s in senders)} acked={len(acked)} stored={len(seen)} "
        f"unknown={sum(s.unknown for s in senders)} tmp_left={len(os.listdir(maildir / 'tmp'))}"
    )


def test_kill_9_while_forwarding_never_loses_an_acknowledged_message(tmp_path):
    with aiosmtpd_next_hop() as (hop, controller):
        senders = crash_loop(
            tmp_path, f"queue/smtp-forward 127.0.0.1 {controller.port} timeout=10", lambda: None
        )
        received = list(hop.messages)
    seen: Counter[str] = Counter()
    for message_ in received:
        head, _, _ = message_.content.partition(b"\r\n\r\n")
        (field,) = [line for line in head.split(b"\r\n") if line.startswith(b"X-Id: ")]
        ident = field[6:].decode()
        # The next hop never got a truncated message: a kill mid-DATA aborts the connection
        # before the final dot, and the next hop throws that text away.
        assert message_.content.endswith(message(ident).split(b"\r\n", 1)[1]), ident
        seen[ident] += 1
    acked = [ident for sender in senders for ident in sender.acked]
    assert [ident for ident in acked if seen[ident] != 1] == []
    assert len(acked) >= 20, f"too few messages to mean anything: {len(acked)}"
    print(f"forward: acked={len(acked)} at_next_hop={len(seen)}")
