"""Next hops for the forwarding tests: real, independent servers on loopback.

* :func:`aiosmtpd_next_hop` runs aiosmtpd (its SMTP class, or its LMTP class) in its own
  thread and event loop, with a :class:`Recorder` handler whose replies a test sets.
* :class:`ScriptedServer` is a raw socket server for what no real server does on
  purpose: never answering, or dropping the connection in the middle of DATA.

Everything listens on 127.0.0.1 (or a Unix socket) and is stopped by the context manager.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller, UnixSocketController
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from tests.support.process import free_port


@dataclass
class Received:
    """One message a next hop accepted."""

    sender: str
    recipients: list[str]
    content: bytes
    peer: Any


@dataclass
class Recorder:
    """aiosmtpd handler: records everything, answers as the test says.

    ``mail_reply`` / ``rcpt_replies`` (address -> reply) / ``data_reply`` replace the
    usual 250s. ``lmtp_replies`` (address -> reply) makes the end of DATA answer one line
    per accepted recipient, as a real LMTP server does (aiosmtpd's LMTP class itself
    sends a single reply, so the handler writes them all).
    """

    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    lmtp_replies: dict[str, str] | None = None
    messages: list[Received] = field(default_factory=list)
    #: the client address of each EHLO/LHLO, i.e. one entry per connection used
    hellos: list[Any] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    event: threading.Event = field(default_factory=threading.Event)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:  # fmt: skip
        self.hellos.append(session.peer)
        self.commands.append("EHLO")
        session.host_name = hostname  # the new-style hook must set it (aiosmtpd 1.4)
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:  # fmt: skip
        self.commands.append(f"MAIL {address}")
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:  # fmt: skip
        self.commands.append(f"RCPT {address}")
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.commands.append("RSET")
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.commands.append("DATA")
        content = envelope.original_content or envelope.content
        if self.lmtp_replies is not None:
            replies = self.lmtp_replies
            lines = [replies.get(r, f"250 2.0.0 <{r}> delivered") for r in envelope.rcpt_tos]
            for rcpt, line in zip(envelope.rcpt_tos, lines, strict=True):
                if line.startswith("2"):
                    self._keep(envelope, [rcpt], content, session)
            return "\r\n".join(lines)
        if self.data_reply:
            return self.data_reply
        self._keep(envelope, list(envelope.rcpt_tos), content, session)
        return f"250 2.0.0 Ok: queued as NH{len(self.messages)}"

    def _keep(self, envelope: Any, rcpts: list[str], content: bytes, session: Any) -> None:
        self.messages.append(Received(envelope.mail_from, rcpts, content, session.peer))
        self.event.set()


class _LMTPController(Controller):
    def factory(self) -> SMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


class _LMTPUnixController(UnixSocketController):
    def factory(self) -> SMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


@contextlib.contextmanager
def aiosmtpd_next_hop(
    handler: Recorder | None = None,
    *,
    lmtp: bool = False,
    unix_socket: str | None = None,
    ssl_context: Any = None,
    **smtp_kwargs: Any,
) -> Iterator[tuple[Recorder, Any]]:
    """Run aiosmtpd; yields (handler, controller). ``controller.port`` is its port.

    ``ssl_context`` with ``require_starttls`` etc. in ``smtp_kwargs`` turns STARTTLS on
    (``tls_context=`` is the SMTP class's own name for it).
    """
    handler = handler or Recorder()
    kwargs = {"hostname": "127.0.0.1", "port": free_port(), "ready_timeout": 10.0}
    if unix_socket is not None:
        cls: Any = _LMTPUnixController if lmtp else UnixSocketController
        controller = cls(handler, unix_socket=unix_socket, ready_timeout=10.0, **smtp_kwargs)
    else:
        cls = _LMTPController if lmtp else Controller
        controller = cls(handler, **kwargs, **smtp_kwargs)
    controller.start()
    try:
        yield handler, controller
    finally:
        controller.stop()


class ScriptedServer:
    """A raw TCP server on 127.0.0.1 whose every connection runs ``script(sock)``.

    The script talks bytes directly, so it can misbehave as no real server would.
    Connections are counted in ``accepted``; all sockets are closed on exit.
    """

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        self.script = script
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.received = bytearray()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._socks.append(sock)
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.script(sock)

    def read_line(self, sock: socket.socket, timeout: float = 5.0) -> bytes:
        sock.settimeout(timeout)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                break
            data += chunk
        self.received += data
        return data

    def hang(self, sock: socket.socket) -> None:
        """Keep the connection open, answering nothing, until the server stops."""
        while not self._stop.wait(0.1):
            pass

