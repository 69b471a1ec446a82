"""A web application receiving mail from ``queue/http``, on a loopback port, in a thread.

Python's own ``http.server``, so the server side shares no code with the client under
test. Each request is recorded (path, header fields, body) and its signature checked the
way docs/config.md tells an application to; the path picks the answer:

* ``/ok``: ``200 OK``; ``/status/NNN``: that status, with ``WebApp.body`` as its body;
* ``/hang``: no answer until the test ends (bounded: 30 seconds at most);
  ``/unfinished/NNN``: that status and ``WebApp.body``, then silence, the same way;
* ``/verify``: ``401`` when the signature does not verify, else ``200``.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["WebApp", "web_app", "verify"]

FIELDS = ("X-Queue-Id", "X-Envelope-From", "X-Envelope-To", "X-Client-IP", "X-Helo",
          "X-Auth-User")  # fmt: skip


def verify(secret: bytes, headers: Any, body: bytes) -> bool:
    """The documented check: HMAC-SHA256 over X-Timestamp and the envelope fields (repeated
    ones joined with ", "), each followed by a newline, then the body."""
    def value(name: str) -> bytes:
        # http.server decodes field values as Latin-1: encoding back gives the octets sent
        return ", ".join(headers.get_all(name) or []).encode("latin-1")

    signed = b"".join(value(name) + b"\n" for name in ("X-Timestamp", *FIELDS)) + body
    expected = "sha256=" + hmac.new(secret, signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get("X-Signature", ""))


@dataclass
class Request:
    path: str
    headers: Any
    body: bytes
    verified: bool


@dataclass
class WebApp:
    url: str
    secret: bytes
    requests: list[Request] = field(default_factory=list)
    body: bytes = b""
    release: threading.Event = field(default_factory=threading.Event)


def _handler(app: WebApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            verified = verify(app.secret, self.headers, body)
            app.requests.append(Request(self.path, self.headers, body, verified))
            if self.path == "/hang":
                app.release.wait(30)
                return
            if self.path.startswith("/unfinished/"):  # the status, part of the body, silence
                self.send_response(int(self.path.rsplit("/", 1)[1]))
                self.send_header("Content-Length", str(len(app.body) + 100))
                self.end_headers()
                self.wfile.write(app.body)
                self.wfile.flush()
                app.release.wait(30)
                return
            if self.path == "/verify":
                self._answer(200 if verified else 401, b"bad signature" if not verified else b"")
            elif self.path.startswith("/status/"):
                self._answer(int(self.path.rsplit("/", 1)[1]), app.body)
            else:
                self._answer(200, b"thanks\n")

        def _answer(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextmanager
def web_app(secret: bytes) -> Iterator[WebApp]:
    """Serve on 127.0.0.1 (a free port) until the block ends."""
    app = WebApp("", secret)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(app))
    server.daemon_threads = True
    app.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield app
    finally:
        app.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
