"""A small blocking SMTP client over a raw socket, for the end-to-end tests.

Unlike ``smtplib`` it sends exactly the bytes it is given (bare LF, NUL, over-long lines,
several commands in one write) and reads replies one at a time, so a test waits only as
long as the server takes to answer, never for a quiet period. Run it through
``tests.support.server.in_thread``: the server answers from the test's reactor.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from twisted.logger import LogLevel, formatEvent, globalLogPublisher

__all__ = [
    "Client",
    "Reply",
    "describe",
    "ehlo",
    "logged_errors",
    "maildir_line",
    "plugin_of",
    "split_message",
    "watch_errors",
]


@dataclass(frozen=True)
class Reply:
    """One complete reply: its code and the text of each line (without the code)."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def last(self) -> str:
        return self.lines[-1]


class ConnectionClosed(Exception):
    """The server closed the connection before a whole reply arrived."""


class Client:
    """One SMTP connection; ``greeting`` is read on connect."""

    def __init__(self, address: tuple[str, int], *, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.timeout = timeout
        self._buf = b""
        self.greeting = self.reply()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes | str) -> None:
        """Send raw bytes (a str is encoded as ASCII); nothing is added."""
        self.sock.sendall(data.encode("ascii") if isinstance(data, str) else data)

    def _line(self) -> bytes:
        deadline = time.monotonic() + self.timeout
        while b"\r\n" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete reply line; have {self._buf[:200]!r}")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionClosed(f"closed; partial reply {self._buf[:200]!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def reply(self) -> Reply:
        """Read one reply (all lines of a multi-line reply)."""
        lines: list[str] = []
        for _ in range(1000):
            line = self._line().decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                raise AssertionError(f"malformed reply line {line!r}")
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(int(line[:3]), tuple(lines))
        raise AssertionError("reply of more than 1000 lines")

    def replies(self, count: int) -> list[Reply]:
        return [self.reply() for _ in range(count)]

    def cmd(self, line: bytes | str) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        data = line.encode("ascii") if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def code(self, line: bytes | str) -> int:
        return self.cmd(line).code

    def message(self, text: bytes) -> Reply:
        """After a 354: send message text (already dot-stuffed) and the end marker."""
        self.send(text + b"\r\n.\r\n")
        return self.reply()

    def transaction(self, sender: str, recipients: list[str], text: bytes) -> Reply:
        """MAIL, RCPTs, DATA and the text; every step before the end must succeed."""
        reply = self.cmd(f"MAIL FROM:{sender}")
        assert reply.code == 250, reply
        for rcpt in recipients:
            reply = self.cmd(f"RCPT TO:{rcpt}")
            assert reply.code == 250, reply
        reply = self.cmd("DATA")
        assert reply.code == 354, reply
        return self.message(text)

    def is_closed(self) -> bool:
        """True once the server has closed the connection (waits up to the timeout).

        Data still arriving before the close is an error: the caller read every reply.
        """
        if self._buf:
            raise AssertionError(f"unread data {self._buf[:200]!r}")
        self.sock.settimeout(self.timeout)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        if chunk:
            raise AssertionError(f"unexpected data {chunk[:200]!r}")
        return True


@contextmanager
def logged_errors() -> Iterator[list[dict[str, Any]]]:
    """Collect log events at error level or with a traceback while the block runs.

    The server contains a failing handler (the client gets a 451) and logs it, so a bug
    can hide behind a reply a test does not look at closely; the e2e modules fail a test
    that leaves such an event unexamined.
    """
    with _collected(
        lambda event: "log_failure" in event
        or event.get("log_level") in (LogLevel.error, LogLevel.critical)
    ) as found:
        yield found


@contextmanager
def logged_events(*names: str) -> Iterator[list[dict[str, Any]]]:
    """Collect the log events whose ``event`` field is one of ``names`` while the block runs
    (``event="deadline"``, ``"milter"``, ``"redis_outage"`` ...): what a refusal or an
    outage logs is part of the behaviour a test pins."""
    with _collected(lambda event: event.get("event") in names) as found:
        yield found


@contextmanager
def _collected(wanted: Callable[[dict[str, Any]], bool]) -> Iterator[list[dict[str, Any]]]:
    """The log events ``wanted`` accepts, published while the block runs."""
    found: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if wanted(event):
            found.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield found
    finally:
        globalLogPublisher.removeObserver(observer)


def describe(event: dict[str, Any]) -> str:
    """One logged error as text, with its traceback if it has one."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return text


def watch_errors() -> Iterator[list[dict[str, Any]]]:
    """For an autouse fixture: yield the logged errors, then fail if any were left.

    A test that expects the server to log an error examines the list and clears it.
    """
    with logged_errors() as found:
        yield found
        assert not found, "\n".join(describe(event) for event in found)


def ehlo(server: Any) -> Client:
    """A connection to ``server`` that was greeted with 220 and said EHLO client.test."""
    client = Client(server.address)
    assert client.greeting.code == 220, client.greeting
    assert client.cmd("EHLO client.test").code == 250
    return client


def plugin_of(server: Any, cls: type) -> Any:
    """The running instance of a plugin class passed to ``qpconn_server(plugins=...)``."""
    (found,) = [p for p in server.factory.plugins if type(p) is cls]
    return found


def maildir_line(path: Any) -> str:
    """The plugin line for a Maildir queue at ``path``."""
    return f"queue/maildir {path}"


def split_message(message: bytes, newline: bytes = b"\n") -> tuple[list[bytes], bytes]:
    """Header fields (folded lines joined with a space) and the body of a stored message.

    A Maildir file's lines end in LF (``queue/maildir``'s default); ``newline=b"\\r\\n"``
    for one stored with ``line_endings=crlf``. A header stored with the other line ending
    fails the assertion: the split checks how the file was written, too.
    """
    head, sep, body = message.partition(newline * 2)
    assert sep, message
    if newline == b"\n":
        assert b"\r" not in head, f"CR in a header stored with LF line endings: {head!r}"
    fields: list[bytes] = []
    for line in head.split(newline):
        if line[:1] in (b" ", b"\t"):
            fields[-1] += b" " + line.strip()
        else:
            fields.append(line)
    return fields, body
