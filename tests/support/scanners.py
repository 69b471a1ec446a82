"""Small real spamd and clamd protocol servers on loopback, and Debian's real spamd.

clamd needs signature databases that cannot be downloaded here, so ``virus/clamdscan`` is
tested against :class:`ClamdTestServer`, which speaks clamd's ``INSTREAM`` protocol
(length-prefixed chunks, a zero length to end, ``stream: ... FOUND``/``OK`` answers, the
size limit error) and flags the EICAR test string. :class:`SpamdTestServer` speaks the
spamd protocol (``SYMBOLS``/``CHECK`` with ``Content-length``) with a few scoring rules,
for the cases a real spamd cannot be made to show (hanging, errors); the real one from
Debian's ``spamd`` package is used too when it is installed (:func:`start_real_spamd`).

Both record what they were sent. ``mode`` may be set while they run: ``"hang"`` (read
everything, never answer), ``"error"`` (answer with the daemon's error form), ``"garbage"``.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from tests.support.policy import Reply, send_message, sessions_plugin
from tests.support.server import in_thread

__all__ = [
    "EICAR",
    "GTUBE",
    "SpamdTestServer",
    "ClamdTestServer",
    "start_real_spamd",
    "scanning_server",
    "deliver",
]

# Built from pieces so that no file of the repository is itself flagged by a scanner.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*" + b"GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class _Server:
    """Shared lifecycle: listen on 127.0.0.1:0 (or a unix socket), record, stop."""

    def __init__(self, unix_path: str | None = None) -> None:
        self.mode = "normal"
        self.received: list[Any] = []
        self.connections = 0
        factory = Factory.forProtocol(self.protocol)
        factory.noisy = False
        if unix_path:
            self.port = reactor.listenUNIX(unix_path, factory)
            self.address = unix_path
        else:
            self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.address = f"127.0.0.1:{self.port.getHost().port}"

    def protocol(self) -> Protocol:
        raise NotImplementedError

    def stop(self) -> Any:
        """Stop listening (again is harmless); a Deferred."""
        return defer.maybeDeferred(self.port.stopListening)


class _Spamd(Protocol):
    def __init__(self, owner: SpamdTestServer) -> None:
        self.owner, self.buffer, self.answered = owner, b"", False

    def connectionMade(self) -> None:
        self.owner.connections += 1

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
        self.transport.write(self.owner.answer(body[:length]))
        self.transport.loseConnection()


class SpamdTestServer(_Server):
    """spamd's protocol; each rule whose bytes occur in the message adds its score."""

    required = 5.0
    rules = {GTUBE: ("GTUBE", 1000.0), b"cheap pills": ("DRUGS_CHEAP", 3.5),
             b"act now": ("URGENT", 2.0)}  # fmt: skip

    def protocol(self) -> Protocol:
        return _Spamd(self)

    def answer(self, message: bytes) -> bytes:
        if self.mode == "error":
            return b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch)\r\n\r\n"
        if self.mode == "garbage":
            return b"HTTP/1.0 400 Bad Request\r\n\r\n"
        hits = [(name, score) for key, (name, score) in self.rules.items() if key in message]
        score = sum(score for _, score in hits)
        flag = "True" if score >= self.required else "False"
        body = ",".join(name for name, _ in hits).encode()
        return (
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\n" % len(body)
            + f"Spam: {flag} ; {score:.1f} / {self.required:.1f}\r\n\r\n".encode()
            + body
        )


class _Clamd(Protocol):
    def __init__(self, owner: ClamdTestServer) -> None:
        self.owner, self.buffer, self.stream, self.state = owner, b"", b"", "command"

    def connectionMade(self) -> None:
        self.owner.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        for _ in range(100000):  # bounded: every pass consumes input or returns
            if self.state == "command":
                if b"\0" not in self.buffer:
                    return
                command, _, self.buffer = self.buffer.partition(b"\0")
                if command != b"zINSTREAM":
                    self._reply(b"UNKNOWN COMMAND")
                    return
                self.state = "chunks"
            elif self.state == "chunks":
                if len(self.buffer) < 4:
                    return
                (size,) = struct.unpack("!I", self.buffer[:4])
                if size == 0:
                    self.buffer = self.buffer[4:]
                    self._finish()
                    return
                if len(self.stream) + size > self.owner.max_stream:
                    self._reply(b"INSTREAM size limit exceeded. ERROR")
                    return
                if len(self.buffer) < 4 + size:
                    return
                self.stream += self.buffer[4 : 4 + size]
                self.owner.chunks.append(size)
                self.buffer = self.buffer[4 + size :]
            else:
                return

    def _finish(self) -> None:
        self.owner.received.append(self.stream)
        if self.owner.mode == "hang":
            self.state = "done"
            return
        if self.owner.mode == "error":
            self._reply(b"stream: Can't allocate memory ERROR")
        elif EICAR in self.stream:
            self._reply(b"stream: Eicar-Test-Signature FOUND")
        else:
            self._reply(b"stream: OK")

    def _reply(self, text: bytes) -> None:
        self.state = "done"
        self.transport.write(text + b"\0")
        self.transport.loseConnection()


class ClamdTestServer(_Server):
    """clamd's INSTREAM protocol; flags EICAR; refuses streams over ``max_stream``."""

    max_stream = 1 << 20

    def __init__(self, unix_path: str | None = None) -> None:
        self.chunks: list[int] = []
        super().__init__(unix_path)

    def protocol(self) -> Protocol:
        return _Clamd(self)


def start_real_spamd(directory: str) -> tuple[subprocess.Popen[bytes], str] | None:
    """Debian's spamd on a free loopback port, local rules only; None if not installed.

    Waits (at most 20 s) until it accepts connections; the caller terminates it.
    """
    spamd = shutil.which("spamd") or ("/usr/sbin/spamd" if os.path.exists("/usr/sbin/spamd")
                                      else None)  # fmt: skip
    if spamd is None:
        return None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [spamd, "--local", f"--listen=127.0.0.1:{port}", "--allowed-ips=127.0.0.1",
               "--max-children=1", "--min-children=1", "--nouser-config", "--syslog=stderr",
               f"--pidfile={directory}/spamd.pid"]  # fmt: skip
    if os.geteuid() == 0:
        command.append("--username=nobody")
    with open(os.path.join(directory, "spamd.log"), "wb") as log:  # the child keeps its copy
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    process.terminate()
    process.wait(5)
    return None


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
