"""nginx's mail proxy (Debian's nginx + libnginx-mod-mail) in front of qpconn, with XCLIENT.

The test writes an nginx configuration with one SMTP ``server`` on a loopback port,
``xclient on`` and ``smtp_auth none``, and runs a tiny HTTP auth server (twisted.web, in
the test's reactor) that tells nginx where qpconn listens. The client binds 127.0.0.2 and
talks to nginx; nginx connects to qpconn from 127.0.0.1, which is qpconn's only
``xclient_hosts`` entry. The Connection the hooks see and the Received header must name
127.0.0.2, the client nginx was proxying, not nginx.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web import resource, server

from qpconn.config import Config
from tests.e2e_client import split_message
from tests.support.process import free_port, running
from tests.support.server import in_thread
from tests.test_proxy_haproxy import CLIENT_IP, connect_when_ready
from tests.test_xclient import Recorder

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"
MESSAGE = b"From: a@example.org\r\nSubject: via nginx\r\n\r\nhello through the proxy\r\n"


class AuthHTTP(resource.Resource):
    """nginx's auth_http protocol, answering every request: go to qpconn."""

    isLeaf = True

    def __init__(self, backend_port: int) -> None:
        super().__init__()
        self.backend_port = backend_port
        self.requests: list[dict[str, str]] = []

    def render_GET(self, request: Any) -> bytes:
        headers = request.requestHeaders.getAllRawHeaders()
        self.requests.append({key.decode().lower(): values[0].decode() for key, values in headers})
        request.setHeader(b"Auth-Status", b"OK")
        request.setHeader(b"Auth-Server", b"127.0.0.1")
        request.setHeader(b"Auth-Port", str(self.backend_port).encode())
        return b""


def nginx_config(path: Path, port: int, auth_port: int) -> Path:
    """The smallest mail proxy: one SMTP server, XCLIENT to the backend, no SMTP AUTH."""
    path.write_text(
        "\n".join(
            [
                f"load_module {MAIL_MODULE};",
                "daemon off;",
                "master_process off;",
                f"pid {path.parent}/nginx.pid;",
                f"error_log {path.parent}/error.log info;",
                "events { worker_connections 32; }",
                "mail {",
                "    server_name proxy.test;",
                f"    auth_http 127.0.0.1:{auth_port}/auth;",
                "    proxy on;",
                "    xclient on;",
                "    smtp_auth none;",
                "    proxy_pass_error_message on;",
                f"    server {{ listen 127.0.0.1:{port}; protocol smtp; }}",
                "}",
                "",
            ]
        )
    )
    return path


@pytest.fixture
def nginx_available() -> None:
    if not os.access(NGINX, os.X_OK):
        pytest.skip("nginx is not installed (apt-get install nginx libnginx-mod-mail)")
    if not os.path.exists(MAIL_MODULE):
        pytest.skip("nginx's mail module is not installed (apt-get install libnginx-mod-mail)")


@pytest.fixture
def auth_site() -> Iterator[Any]:
    sites: list[Any] = []

    def start(backend_port: int) -> tuple[AuthHTTP, int]:
        auth = AuthHTTP(backend_port)
        port = reactor.listenTCP(0, server.Site(auth), interface="127.0.0.1")
        sites.append(port)
        return auth, port.getHost().port

    yield start
    for port in sites:
        pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_nginx_hands_the_client_over_with_xclient(
    qpconn_server, tmp_path, nginx_available, auth_site
):
    recorder = Recorder(Config(None), "recorder")
    qp = qpconn_server(
        plugins=["relay", recorder, "rcpt_ok", "queue/maildir"],
        files={"xclient_hosts": ["127.0.0.1"]},
    )
    auth, auth_port = auth_site(qp.address[1])
    port = free_port()
    folder = tmp_path / "nginx"
    folder.mkdir()
    config = nginx_config(folder / "nginx.conf", port, auth_port)
    command = [NGINX, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(config)]

    def client() -> list[int]:
        with running(command, port, str(folder)), connect_when_ready(port) as smtp:
            codes = [smtp.greeting.code, smtp.cmd("EHLO client.test").code]
            codes.append(smtp.transaction("<a@example.org>", ["<user@mx.test>"], MESSAGE).code)
            codes.append(smtp.cmd("QUIT").code)
            return codes

    try:
        codes = await in_thread(client)
    except Exception:
        print((folder / "error.log").read_text(errors="replace"))
        raise
    await qp.wait_sessions_closed()
    assert codes == [220, 250, 250, 221]
    assert auth.requests and auth.requests[0]["client-ip"] == CLIENT_IP
    # nginx's own connection first, then the client it handed over
    assert [c["remote_ip"] for c in recorder.connects] == ["127.0.0.1", CLIENT_IP]
    (seen,) = recorder.messages
    assert seen["remote_ip"] == CLIENT_IP and seen["hello_host"] == "client.test"
    assert seen["notes"]["xclient"]["peer"][0] == "127.0.0.1"
    assert seen["notes"]["xclient"]["attributes"]["ADDR"] == CLIENT_IP
    (message,) = qp.messages()
    received = next(f for f in split_message(message)[0] if f.startswith(b"Received:"))
    assert received.startswith(f"Received: from client.test (unknown [{CLIENT_IP}])".encode())
