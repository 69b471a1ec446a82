"""kill -9 at random moments never loses an acknowledged message nor shows a partial one.

``twistd -n qpconn`` runs as a real separate process storing into a Maildir (or forwarding
to a next hop). Two client threads send messages in a loop, each with its own Message-ID
(and its id in every body line, so a truncated or mixed-up file is recognised). The
server is killed with SIGKILL at random points, a bounded number of times, and restarted
on the same port. Then:

* after every kill, and at the end, every stored message is whole: the exact text sent,
  behind the trace fields qpconn adds, and nothing stored that was never sent;
* every message the server acknowledged (250 after DATA) is stored exactly once, each
  one checked by its Message-ID; one whose reply was lost to a kill is stored at most
  once; one whose text was never sent is not stored at all;
* a client failure is tolerated only when a kill explains it: the connection was closed,
  reset or refused after the server it talked to was killed. Any other failure (a reply
  other than the expected one, a timeout, a reset with no kill) fails the test;
* the spool directory is empty (stale files of the killed processes are removed at the
  next start, the last process's own at its end).

The kill times and message sizes come from one seed, printed with every run and in every
failure message; ``QPCONN_CRASH_SEED=1234 pytest tests/test_crash_safety.py`` replays the
same schedule (the threads' interleaving is the machine's, so a replay is close, not
identical).
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
from typing import Any

import pytest

from tests.e2e_client import Client, ConnectionClosed
from tests.support.nexthop import aiosmtpd_next_hop
from tests.support.process import free_port, twistd_command, wait_for_port
from tests.support.process import stop as stop_process

KILLS = 5
SENDERS = 2
#: messages per sender thread, and per connection: bounds on the loop, not targets
MAX_MESSAGES = 2000
PER_SESSION = 50
#: seconds a reply may take; generous for a loaded machine (a kill gives a close, not silence)
REPLY_TIMEOUT = 30.0
#: seconds a sender waits for a restarted server (start-up itself is bounded by wait_for_port)
RESTART_WAIT = 60.0
SENDER = "a@example.org"
RECIPIENT = "user@localhost"
#: what queue/maildir writes before the message (then qpconn's Received field)
MAILDIR_PREFIX = f"Return-Path: <{SENDER}>\r\nDelivered-To: {RECIPIENT}\r\n".encode()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The run's seed: QPCONN_CRASH_SEED, or a fresh one; shown so a failure can be replayed."""
    given = os.environ.get("QPCONN_CRASH_SEED")
    value = int(given) if given else random.SystemRandom().randrange(10**6)
    # In the test's report (--junitxml writes it as a property). Appended directly, not
    # through record_property, which warns under the default xunit2 junit family.
    request.node.user_properties.append(("crash_seed", value))
    # Captured output is shown with a failure, and always with -s.
    print(f"crash test seed: QPCONN_CRASH_SEED={value}")
    return value


def replay(seed: int) -> str:
    """The tail of every failure message: how to run this schedule again."""
    return f" [replay: QPCONN_CRASH_SEED={seed} pytest tests/test_crash_safety.py]"


def message_id(seed: int, ident: str) -> bytes:
    return b"<%s.%d@crash.test>" % (ident.encode(), seed)


def message(seed: int, ident: str) -> bytes:
    """The text for ``ident`` as sent (before the end marker); about a third spool to disk.

    A pure function of (seed, ident), so a checker can rebuild what was sent from the
    Message-ID alone.
    """
    large = random.Random(f"{seed}:{ident}").random() < 1 / 3
    lines = 1200 if large else 20
    body = b"".join(b"%s line %05d\r\n" % (ident.encode(), i) for i in range(lines))
    return b"Subject: crash test\r\nMessage-ID: %s\r\n\r\n%s" % (message_id(seed, ident), body)


def ident_of(seed: int, data: bytes) -> str:
    """The sender's id from a stored message's Message-ID field (AssertionError if none)."""
    head = data.partition(b"\r\n\r\n")[0]
    fields = [line for line in head.split(b"\r\n") if line.startswith(b"Message-ID: ")]
    assert len(fields) == 1, f"{len(fields)} Message-ID fields in {head[:300]!r}" + replay(seed)
    value = fields[0][len(b"Message-ID: ") :]
    suffix = b".%d@crash.test>" % seed
    assert value.startswith(b"<") and value.endswith(suffix), (
        f"foreign Message-ID {value!r}" + replay(seed)
    )
    return value[1 : -len(suffix)].decode()


def check_intact(seed: int, data: bytes, prefix: bytes) -> str:
    """``data`` is one whole message as sent, behind ``prefix`` and a Received field only.

    Returns its id. Anything else (a truncated file, text of another message, a field
    that is not ours) raises AssertionError.
    """
    ident = ident_of(seed, data)
    sent = message(seed, ident)
    again = replay(seed)
    assert data.startswith(prefix), f"{ident}: stored without {prefix!r}: {data[:200]!r}{again}"
    added = data[len(prefix) : len(data) - len(sent)]
    assert data.endswith(sent), f"{ident}: stored text is not what was sent (partial?){again}"
    assert added.startswith(b"Received: ") and added.endswith(b"\r\n"), (
        f"{ident}: unexpected text before the message: {added[:200]!r}{again}"
    )
    assert all(line[:1] in (b" ", b"\t") for line in added.split(b"\r\n")[1:-1]), (
        f"{ident}: more than the Received field was added: {added[:300]!r}{again}"
    )
    return ident


def check_maildir(seed: int, new: Path) -> Counter[str]:
    """Every file in new/ is one whole message; how often each id is there.

    A Maildir file has LF line endings (no CR at all: the messages sent have none but
    their CRLFs) and the size its name gives (``,S=``); with those checked, its lines are
    compared with what was sent.
    """
    seen: Counter[str] = Counter()
    if new.exists():
        for name in sorted(os.listdir(new)):
            data = (new / name).read_bytes()
            assert b"\r" not in data, f"{name}: CR in a Maildir file{replay(seed)}"
            assert name.endswith(f",S={len(data)}"), f"{name}: {len(data)} bytes{replay(seed)}"
            as_sent = data.replace(b"\n", b"\r\n")
            seen[check_intact(seed, as_sent, MAILDIR_PREFIX)] += 1
    return seen


class ServerLife:
    """How many times the server was killed, and whether one is up, under one lock.

    A sender notes the kill count when it connects; a failure is the kill's doing only if
    the count moved since. The main thread counts a kill *before* sending the signal, so
    every close or reset the kill causes is seen after the count changed.
    """

    def __init__(self, stop: threading.Event) -> None:
        self.kills = 0
        self.up = False
        self.stop = stop
        self.changed = threading.Condition()

    def going_down(self) -> None:
        with self.changed:
            self.up = False
            self.kills += 1

    def came_up(self) -> None:
        with self.changed:
            self.up = True
            self.changed.notify_all()

    def finish(self) -> None:
        self.stop.set()
        with self.changed:
            self.changed.notify_all()

    def wait_up(self, timeout: float) -> int | None:
        """The kill count once a server is up; None when the run is over (or never came up)."""
        with self.changed:
            self.changed.wait_for(lambda: self.up or self.stop.is_set(), timeout)
            if self.stop.is_set() or not self.up:
                return None
            return self.kills

    def killed_since(self, kills: int) -> bool:
        with self.changed:
            return self.kills != kills


class Sender(threading.Thread):
    """Sends messages until stopped; sorts each one into acknowledged, unknown or unsent.

    ``failures`` collects what no kill explains; the thread stops at the first one.
    """

    def __init__(self, number: int, port: int, seed: int, life: ServerLife) -> None:
        super().__init__(daemon=True)
        self.number, self.port, self.seed, self.life = number, port, seed, life
        self.acked: list[str] = []
        #: the text went out (or part of it), then the connection died before the reply
        self.unknown: list[str] = []
        self.sent = 0
        self.failures: list[str] = []
        self.gave_up = False  # ended because no server came up in time
        #: the message in hand, and whether its text has started to go out
        self.current: str | None = None
        self.text_sent = False

    def run(self) -> None:
        while not self.life.stop.is_set() and self.sent < MAX_MESSAGES and not self.failures:
            kills = self.life.wait_up(RESTART_WAIT)
            if kills is None:
                self.gave_up = not self.life.stop.is_set()
                return
            client: Client | None = None
            self.current, self.text_sent = None, False
            try:
                client = Client(("127.0.0.1", self.port), timeout=REPLY_TIMEOUT)
                self.session(client)
            except (ConnectionClosed, ConnectionError) as exc:
                if not self.life.killed_since(kills):
                    self.failures.append(f"{self.current}: {exc!r} and no kill to explain it")
                elif self.text_sent:
                    self.unknown.append(str(self.current))
            except Exception as exc:  # a wrong reply, a timeout: never the kill's doing
                self.failures.append(f"{self.current}: {exc!r}")
            finally:
                if client is not None:
                    client.close()

    def expect(self, ident: str, what: str, reply: Any, code: int) -> None:
        if reply.code != code:
            raise AssertionError(f"{ident}: {what} answered {reply.code} {reply.text!r}")

    def session(self, client: Client) -> None:
        self.expect("-", "greeting", client.greeting, 220)
        self.expect("-", "EHLO", client.cmd("EHLO client.test"), 250)
        for _ in range(PER_SESSION):
            if self.life.stop.is_set() or self.sent >= MAX_MESSAGES:
                return
            ident = f"s{self.number}-{self.sent}"
            self.sent += 1
            self.current, self.text_sent = ident, False
            self.expect(ident, "MAIL", client.cmd(f"MAIL FROM:<{SENDER}>"), 250)
            self.expect(ident, "RCPT", client.cmd(f"RCPT TO:<{RECIPIENT}>"), 250)
            self.expect(ident, "DATA", client.cmd("DATA"), 354)
            self.text_sent = True  # from the first byte on, the server may have it all
            client.send(message(self.seed, ident) + b".\r\n")
            self.expect(ident, "end of DATA", client.reply(), 250)
            self.acked.append(ident)
            self.text_sent = False


def crash_loop(
    tmp_path: Path, seed: int, queue_line: str, check: Callable[[], object]
) -> list[Sender]:
    """Run the server with ``queue_line``, kill it KILLS times while two clients send,
    calling ``check`` after each kill; return the senders (what each message became)."""
    rng = random.Random(seed)
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
    life = ServerLife(threading.Event())
    senders = [Sender(n, port, seed, life) for n in range(SENDERS)]

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(port, process)
        life.came_up()
        return process

    process = start()
    try:
        for sender in senders:
            sender.start()
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.3, 1.0))
            life.going_down()
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            check()
            process = start()
        time.sleep(0.5)
        life.finish()
        for sender in senders:
            sender.join(REPLY_TIMEOUT * 2)
            assert not sender.is_alive(), f"sender {sender.number} still running" + replay(seed)
    finally:
        life.finish()
        stop_process(process)
        log.close()
    failures = [failure for sender in senders for failure in sender.failures]
    assert failures == [], f"client failures no kill explains: {failures}" + replay(seed)
    assert not any(s.gave_up for s in senders), "a sender saw no server come up" + replay(seed)
    # Stale spool files of the killed processes went at the next start, the last
    # process's own with their transactions.
    assert os.listdir(spool) == [], "spool files left" + replay(seed)
    return senders


def check_outcomes(seed: int, senders: list[Sender], seen: Counter[str], where: str) -> None:
    """Acknowledged: stored exactly once; reply lost: at most once; text never sent: absent."""
    acked = [ident for sender in senders for ident in sender.acked]
    unknown = {ident for sender in senders for ident in sender.unknown}
    not_once = {ident: seen[ident] for ident in acked if seen[ident] != 1}
    assert not_once == {}, f"acknowledged but not {where} exactly once: {not_once}" + replay(seed)
    twice = {ident: count for ident, count in seen.items() if count > 1}
    assert twice == {}, f"{where} more than once: {twice}" + replay(seed)
    unsent = sorted(set(seen) - set(acked) - unknown)
    assert unsent == [], f"{where}, though its text was never sent: {unsent}" + replay(seed)
    assert len(acked) >= 20, f"too few messages to mean anything: {len(acked)}" + replay(seed)


def totals(senders: list[Sender]) -> str:
    """The figures for the report (pytest -s)."""
    sent = sum(s.sent for s in senders)
    acked = sum(len(s.acked) for s in senders)
    unknown = sum(len(s.unknown) for s in senders)
    return f"sent={sent} acked={acked} unknown={unknown}"


def test_kill_9_never_loses_an_acknowledged_message(tmp_path, seed):
    maildir = tmp_path / "maildir"
    new = maildir / "new"
    # Nothing partial, even right after a kill.
    queue_line = f"queue/maildir {maildir}"
    senders = crash_loop(tmp_path, seed, queue_line, lambda: check_maildir(seed, new))
    seen = check_maildir(seed, new)
    check_outcomes(seed, senders, seen, "in the Maildir")
    print(
        f"maildir: {totals(senders)} stored={len(seen)} tmp_left={len(os.listdir(maildir / 'tmp'))}"
    )


def test_kill_9_while_forwarding_never_loses_an_acknowledged_message(tmp_path, seed):
    with aiosmtpd_next_hop() as (hop, controller):
        senders = crash_loop(
            tmp_path, seed, f"queue/smtp-forward 127.0.0.1 {controller.port} timeout=10",
            lambda: None,
        )  # fmt: skip
        received = list(hop.messages)
    # The next hop never got a truncated message: a kill mid-DATA aborts the connection
    # before the final dot, and the next hop throws that text away.
    seen = Counter(check_intact(seed, item.content, b"") for item in received)
    check_outcomes(seed, senders, seen, "at the next hop")
    print(f"forward: {totals(senders)} at_next_hop={len(seen)}")
