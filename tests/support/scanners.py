"""Debian's real spamd and clamd on loopback, and fakes for the faults they cannot show.

:func:`start_real_spamd` runs spamd (Debian's ``spamd`` package) with SpamAssassin's rules
or with a few rules of the test's own (:data:`SPAMD_RULES`); :func:`start_real_clamd` runs
clamd (``clamav-daemon``) with a signature database of one test signature the test writes
itself, so no freshclam download is needed. Both raise :class:`PeerUnavailable`, whose
message is the skip reason, when the program is missing or does not come up.

The fakes answer as a broken daemon would, on demand: :class:`SpamdFault` (``"hang"``:
read everything, never answer -- a real spamd's preforked children keep serving when it
is paused; ``"error"``: spamd's error form; ``"garbage"``: not spamd at all) and
:class:`ClamdFault` (clamd's ``... ERROR`` answer to a stream, which a healthy clamd gives
only when it runs out of memory). They record what they were sent.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from tests.support.policy import Reply, send_message, sessions_plugin
from tests.support.server import in_thread

__all__ = [
    "GTUBE",
    "SPAMD_RULES",
    "CLAMD_TEST_STRING",
    "CLAMD_TEST_VIRUS",
    "CLAMD_STREAM_MAX",
    "PeerUnavailable",
    "RealDaemon",
    "SpamdFault",
    "ClamdFault",
    "start_real_spamd",
    "start_real_clamd",
    "scanning_server",
    "deliver",
]

# Built from pieces so that no file of the repository is itself flagged by a scanner.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*" + b"GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class _Fault:
    """Shared lifecycle: listen on 127.0.0.1:0, record, stop."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.received: list[Any] = []
        factory = Factory.forProtocol(self.protocol)
        factory.noisy = False
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.address = f"127.0.0.1:{self.port.getHost().port}"

    def protocol(self) -> Protocol:
        raise NotImplementedError

    def stop(self) -> Any:
        """Stop listening (again is harmless); a Deferred."""
        return defer.maybeDeferred(self.port.stopListening)


class _Spamd(Protocol):
    def __init__(self, owner: SpamdFault) -> None:
        self.owner, self.buffer, self.answered = owner, b"", False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep or self.answered:
            return
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        length = int(headers.get("content-length", "0"))
        if len(body) < length:
            return
        self.answered = True
        self.owner.received.append((lines[0].decode(), headers, body[:length]))
        if self.owner.mode == "hang":
            return
        if self.owner.mode == "error":
            self.transport.write(b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch)\r\n\r\n")
        else:  # garbage
            self.transport.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        self.transport.loseConnection()


class SpamdFault(_Fault):
    """A spamd-protocol peer that reads a whole request, then fails as ``mode`` says."""

    def protocol(self) -> Protocol:
        return _Spamd(self)


class _Clamd(Protocol):
    def __init__(self, owner: ClamdFault) -> None:
        self.owner, self.buffer, self.done = owner, b"", False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.done or not self.buffer.startswith(b"zINSTREAM\0"):
            return
        rest, stream = self.buffer[len(b"zINSTREAM\0") :], b""
        for _ in range(100000):  # bounded: every pass consumes a chunk or returns
            if len(rest) < 4:
                return
            (size,) = struct.unpack("!I", rest[:4])
            if size == 0:
                break
            if len(rest) < 4 + size:
                return
            stream, rest = stream + rest[4 : 4 + size], rest[4 + size :]
        self.done = True
        self.owner.received.append(stream)
        self.transport.write(b"stream: Can't allocate memory ERROR\0")
        self.transport.loseConnection()


class ClamdFault(_Fault):
    """A clamd-protocol peer that reads a whole INSTREAM, then answers clamd's ERROR."""

    def __init__(self) -> None:
        super().__init__("error")

    def protocol(self) -> Protocol:
        return _Clamd(self)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RealDaemon:
    """A daemon from Debian this test started: its process, where it listens, its log."""

    process: subprocess.Popen[bytes]
    address: str  # "127.0.0.1:PORT"
    log: str
    unix_path: str | None = None
    #: a directory of its own outside the test's tmp_path, removed at stop()
    scratch: str | None = None

    def stop(self) -> None:
        """SIGTERM (SIGCONT first, in case a test paused it), then SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


class PeerUnavailable(Exception):
    """A real peer could not be started; the message names it and says why (a skip reason)."""


def _wait_ready(process: subprocess.Popen[bytes], port: int, log: str, name: str,
                ready: Callable[[socket.socket], bool]) -> None:  # fmt: skip
    """Until ``ready`` says the daemon on ``port`` answers (bounded: 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerUnavailable(f"{name} exited with {process.returncode}: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                if ready(sock):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    process.wait(5)
    raise PeerUnavailable(f"{name} did not answer within 60 s: {_tail(log)}")


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read()[-600:].decode("utf-8", "replace").strip() or "(no output)"
    except OSError:
        return "(no log)"


def _program(name: str) -> str | None:
    return shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}")
                                  else None)  # fmt: skip


#: the rules of :func:`start_real_spamd` with ``rules=True``: what the scoring tests expect
#: of a real spamd (SpamAssassin's own rules are left out, so that no other rule scores)
SPAMD_RULES = """\
body DRUGS_CHEAP /cheap pills/
score DRUGS_CHEAP 3.5
body URGENT /act now/
score URGENT 2.0
# the field our Received line starts with reached spamd (a token score, seen in the tests)
header QPCONN_RECEIVED Received =~ /^from .* by mx\\.test /s
score QPCONN_RECEIVED 0.001
# a forged status field would have reached spamd: it must have been removed
header FORGED_STATUS X-Spam-Status =~ /score=-100/
score FORGED_STATUS 50
required_score 5.0
"""


def start_real_spamd(directory: str, rules: bool = False) -> RealDaemon:
    """Debian's spamd on a free loopback port and a unix socket in ``directory``, local
    tests only, until it accepts.

    With ``rules``, its rules are :data:`SPAMD_RULES` alone, written to ``directory``;
    without, SpamAssassin's installed rules. Raises :class:`PeerUnavailable` (saying why)
    when spamd is not installed or does not come up. The caller stops it.
    """
    spamd = _program("spamd")
    if spamd is None:
        raise PeerUnavailable("spamd is not installed (Debian: apt-get install spamd)")
    port = _free_port()
    unix_path = os.path.join(directory, "spamd.sock")
    command = [spamd, "--local", f"--listen=127.0.0.1:{port}", f"--listen={unix_path}",
               "--allowed-ips=127.0.0.1",
               "--max-children=1", "--min-children=1", "--nouser-config", "--syslog=stderr",
               f"--pidfile={directory}/spamd.pid"]  # fmt: skip
    scratch = None
    if rules:
        # spamd reads its rules as nobody: a directory of their own that nobody may read
        # (a pytest tmp_path is the test user's alone); removed when the daemon stops
        scratch = tempfile.mkdtemp(prefix="qpconn-spamd-rules-")
        os.chmod(scratch, 0o755)
        config = os.path.join(scratch, "rules")
        site = os.path.join(scratch, "site")
        os.makedirs(config, mode=0o755)
        os.makedirs(site, mode=0o755)
        with open(os.path.join(config, "v320.pre"), "w") as pre:  # the rule engine itself
            pre.write("loadplugin Mail::SpamAssassin::Plugin::Check\n")
        with open(os.path.join(config, "qpconn-test.cf"), "w") as cf:
            cf.write(SPAMD_RULES)
        command += [f"--configpath={config}", f"--siteconfigpath={site}"]
    if os.geteuid() == 0:
        command.append("--username=nobody")
    log = os.path.join(directory, "spamd.log")
    with open(log, "wb") as out:  # the child keeps its copy
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    daemon = RealDaemon(process, f"127.0.0.1:{port}", log, unix_path, scratch)
    try:
        _wait_ready(process, port, log, "spamd", lambda sock: True)
    except PeerUnavailable:
        daemon.stop()
        raise
    return daemon


#: a string only the test signature database below knows; built from pieces so that no file
#: of the repository matches it
CLAMD_TEST_STRING = b"QPCONN-CLAMD-" + b"TEST-SIGNATURE-7f3a"
#: what clamd calls it (third-party signatures get ".UNOFFICIAL")
CLAMD_TEST_VIRUS = "QPconn.Test.Signature.UNOFFICIAL"
#: clamd's StreamMaxLength in these tests: a 130 kB message is scanned, a 300 kB one refused
CLAMD_STREAM_MAX = 200 * 1024


def start_real_clamd(directory: str) -> RealDaemon:
    """Debian's clamd (clamav-daemon) on a free loopback port and a unix socket, with a
    signature database of one test signature (:data:`CLAMD_TEST_STRING`) written into
    ``directory``: no freshclam, no download. Waits until it answers PING; raises
    :class:`PeerUnavailable` (saying why) when it is not installed or does not come up.
    """
    clamd = _program("clamd")
    if clamd is None:
        raise PeerUnavailable("clamd is not installed (Debian: apt-get install clamav-daemon)")
    database = os.path.join(directory, "db")
    os.makedirs(database, exist_ok=True)
    with open(os.path.join(database, "qpconn-test.ndb"), "w") as ndb:
        # NAME:TARGET (0: any file):OFFSET (*: anywhere):the bytes in hex
        ndb.write(f"QPconn.Test.Signature:0:*:{CLAMD_TEST_STRING.hex()}\n")
    port = _free_port()
    unix_path = os.path.join(directory, "clamd.ctl")
    log = os.path.join(directory, "clamd.log")
    conf = os.path.join(directory, "clamd.conf")
    with open(conf, "w") as handle:
        handle.write(
            "Foreground yes\n"
            f"LocalSocket {unix_path}\n"
            f"TCPSocket {port}\nTCPAddr 127.0.0.1\n"
            f"DatabaseDirectory {database}\n"
            f"LogFile {log}\n"
            f"PidFile {os.path.join(directory, 'clamd.pid')}\n"
            f"StreamMaxLength {CLAMD_STREAM_MAX // 1024}K\n"
        )
    with open(os.path.join(directory, "clamd.out"), "wb") as out:
        process = subprocess.Popen([clamd, f"--config-file={conf}"], stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip

    def pong(sock: socket.socket) -> bool:
        sock.sendall(b"zPING\0")
        return sock.recv(16) == b"PONG\0"

    try:
        _wait_ready(process, port, os.path.join(directory, "clamd.out"), "clamd", pong)
    except PeerUnavailable as exc:
        raise PeerUnavailable(f"{exc}; clamd.log: {_tail(log)}") from None
    return RealDaemon(process, f"127.0.0.1:{port}", log, unix_path)


def scanning_server(qpconn_server: Any, line: str) -> Any:
    """A qpconn with the scanner plugin ``line`` before a maildir queue.

    ``server.extra["sessions"]`` keeps each session's verdicts, so a test can read what
    the scanner decided as well as the reply.
    """
    recorder = sessions_plugin()
    server = qpconn_server(plugins=["rcpt_ok", line, "queue/maildir maildir", recorder])
    server.extra["sessions"] = recorder
    return server


async def deliver(server: Any, text: bytes) -> Reply:
    """Send ``text`` from 127.0.0.2 and return the last reply, once the session is closed."""
    replies = await in_thread(
        send_message, server.address, "127.0.0.2", "a@example.org", "u@mx.test", text
    )
    await server.wait_sessions_closed()
    return replies[-1]
