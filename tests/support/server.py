"""Start a real qpconn on a loopback port, in the test's own reactor, and talk to it.

Tests run under pytest-twisted, so the reactor is live while a test awaits. Blocking
clients (``smtplib``, raw sockets) therefore run in a thread through :func:`in_thread`,
exactly as an outside client would, while the server answers from the reactor.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred

from qpconn.config import Config
from qpconn.plugins import Plugin
from qpconn.server.factory import SMTPFactory
from qpconn.server.peerinfo import LookupSettings
from qpconn.server.protocol import SMTPServerProtocol
from qpconn.smtp.commands import SMTPCommands
from qpconn.testing import load_listed_plugins

T = TypeVar("T")


def in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    """Run a blocking client in a thread; await the result from the test."""
    return threads.deferToThread(function, *args, **kwargs)


def write_config(directory: str, files: Mapping[str, str | Sequence[str]]) -> str:
    """Write config files (name -> text or list of lines) into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    for name, value in files.items():
        text = value if isinstance(value, str) else "\n".join(value) + "\n"
        with open(os.path.join(directory, name), "w", encoding="utf-8") as handle:
            handle.write(text)
    return directory


@dataclass
class RunningServer:
    """A qpconn listening on 127.0.0.1; ``stop()`` is called by the fixture."""

    factory: SMTPFactory
    port: Any
    maildir: str
    config_dir: str
    host: str = "127.0.0.1"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port.getHost().port

    def stop(self) -> Deferred[None]:
        return self.port.stopListening()

    def messages(self) -> list[bytes]:
        """Every message delivered to the default Maildir's new/, oldest first."""
        new = os.path.join(self.maildir, "new")
        if not os.path.isdir(new):
            return []
        names = sorted(os.listdir(new), key=lambda n: _delivery_order(new, n))
        out = []
        for name in names:
            with open(os.path.join(new, name), "rb") as handle:
                out.append(handle.read())
        return out

    def wait_sessions_closed(self, timeout: float = 5.0) -> Deferred[None]:
        """Fires once every session has finished its disconnect hooks."""
        from twisted.internet import task

        deadline = time.monotonic() + timeout

        def check() -> Any:
            if not self.factory.sessions or time.monotonic() > deadline:
                return None
            return task.deferLater(reactor, 0.02, check)

        return task.deferLater(reactor, 0, check)


def start_server(
    tmp_path: Any,
    *,
    files: Mapping[str, str | Sequence[str]] | None = None,
    plugins: Iterable[Plugin | type[Plugin] | str] | None = None,
    protocol: type[SMTPServerProtocol] | None = None,
    commands: type[SMTPCommands] | None = None,
    factory_class: type[SMTPFactory] = SMTPFactory,
    interface: str = "127.0.0.1",
    lookups: LookupSettings | None = None,
) -> RunningServer:
    """Listen on a free loopback port with a config directory made from ``files``.

    ``plugins`` (instances, classes or config lines) replaces the plugin list; without
    it the ``plugins`` file (or the default list) is used. The default Maildir is
    ``tmp_path/maildir``, and ``me`` defaults to ``mx.test``. Peer lookups are off
    unless ``lookups`` says otherwise (point them at a loopback DNS server: the machine's
    own resolver is not ours to query from tests).
    """
    config_dir = str(tmp_path / "config")
    maildir = str(tmp_path / "maildir")
    contents: dict[str, str | Sequence[str]] = {
        "me": "mx.test",
        "rcpthosts": ["mx.test", "localhost"],
    }
    contents["plugins"] = ["relay", "rcpt_ok", f"queue/maildir {maildir}"]
    contents.update(files or {})
    write_config(config_dir, contents)
    config = Config(config_dir)
    loaded = load_listed_plugins(config, plugins) if plugins is not None else None
    factory = factory_class(
        config,
        loaded,
        protocol=protocol,
        commands=commands,
        lookups=lookups or LookupSettings(rdns=False),
    )
    port = reactor.listenTCP(0, factory, interface=interface)
    return RunningServer(factory, port, maildir, config_dir, host=interface)


def _delivery_order(directory: str, name: str) -> tuple[int, int]:
    """When a Maildir file was written, then (file times are as coarse as the kernel's
    clock tick: several messages may share one) queue/maildir's per-process sequence
    number in its name (``...Q<queue id>_<n>.<host>``)."""
    sequence = re.search(r"_(\d+)\.[^_]*$", name)
    return os.stat(os.path.join(directory, name)).st_mtime_ns, int(sequence[1]) if sequence else 0


def raw_session(
    address: tuple[str, int], payload: bytes, *, replies: int | None = None, timeout: float = 10.0
) -> bytes:
    """Connect, read the greeting, send ``payload`` in one write, then read ``replies`` more
    replies (None: until the server closes, as after a QUIT)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        received = read_replies(sock, 1, timeout=timeout)
        if payload:
            sock.sendall(payload)
            received += read_replies(sock, replies, timeout=timeout)
        return received


def read_replies(sock: socket.socket, count: int | None, *, timeout: float = 10.0) -> bytes:
    """Read until ``count`` more complete replies are in (None: until the peer closes).

    What ends the read is the server's answer or its close, never a pause: a slow server
    is waited for (up to ``timeout`` seconds in all, a ceiling for a broken one).
    """
    data = b""
    deadline = time.monotonic() + timeout
    while count is None or len(reply_codes(data[: data.rfind(b"\r\n") + 2])) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


def reply_codes(data: bytes) -> list[int]:
    """The code of each complete reply in ``data`` (the last line of a multi-line reply)."""
    codes = []
    for line in data.split(b"\r\n"):
        if len(line) >= 4 and line[:3].isdigit() and line[3:4] == b" ":
            codes.append(int(line[:3]))
        elif len(line) == 3 and line.isdigit():
            codes.append(int(line))
    return codes
