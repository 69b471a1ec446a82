"""queue/http end to end: a real qpconn posting to a web application on loopback.

The application is Python's http.server in a thread (tests/support/webapp.py), which
checks each request's signature as docs/config.md tells an application to.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from qpconn.app.metrics import ServerMetrics
from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from tests.e2e_client import watch_errors
from tests.support.policy import BoundClient, codes
from tests.support.process import free_port
from tests.support.server import in_thread
from tests.support.timing import assert_within_timeout
from tests.support.webapp import WebApp, web_app

REPO = Path(__file__).resolve().parent.parent
SECRET = b"a shared secret, 16+ characters"
#: the test client ends it with CRLF . CRLF, so the stored body ends with one CRLF more
MESSAGE = b"Subject: to the app\r\nFrom: a@example.org\r\n\r\nHello, app."


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture
def app() -> Iterator[WebApp]:
    with web_app(SECRET) as app:
        yield app


@pytest.fixture
def deliver(qpconn_server: Any, tmp_path: Any) -> Iterator[Any]:
    """``deliver(url, *options, rcpts=..., mail=...)``: one message through a new server
    whose only queue is ``queue/http url``; the replies after DATA's 354, and the server."""
    (tmp_path / "http.secret").write_bytes(SECRET + b"\n")
    attached: list[ServerMetrics] = []

    async def deliver(url: str, *options: str, rcpts: tuple[str, ...] = ("u@mx.test",),
                      mail: str = "MAIL FROM:<a@example.org>") -> tuple[Any, Any]:
        if not any(option.startswith("secret=") for option in options):
            options = ("secret_file=http.secret", *options)
        server = qpconn_server(plugins=["rcpt_ok", " ".join(["queue/http", url, *options])])
        metrics = ServerMetrics(server.factory).attach()
        attached.append(metrics)
        server.extra["metrics"] = metrics
        commands = ["EHLO client.test", mail, *[f"RCPT TO:<{r}>" for r in rcpts], "DATA"]
        replies = await in_thread(session, server.address, commands)
        await server.wait_sessions_closed()
        assert codes(replies)[-2] == 354, replies
        return replies[-1], server

    yield deliver
    for metrics in attached:
        metrics.detach()


def session(address: tuple[str, int], commands: list[str]) -> list[Any]:
    """The replies to ``commands`` (UTF-8 allowed) and to MESSAGE, from 127.0.0.2."""
    with BoundClient(address, "127.0.0.2") as client:
        replies = [client.greeting] + [client.cmd(c.encode("utf-8")) for c in commands]
        replies.append(client.message(MESSAGE))
        client.cmd("QUIT")
    return replies


def outcomes(server: Any, outcome: str) -> float:
    value = server.extra["metrics"].registry.get_sample_value(
        "qpconn_http_queue_responses_total", {"plugin": "queue/http", "outcome": outcome}
    )
    return value or 0.0


@pytest_twisted.ensureDeferred
async def test_2xx_delivers_with_the_envelope_and_a_signature(app, deliver):
    reply, server = await deliver(f"{app.url}/ok", rcpts=("u@mx.test", "v@mx.test"))
    (request,) = app.requests
    queue_id = request.headers["X-Queue-Id"]
    assert (reply.code, reply.text) == (250, f"2.0.0 Queued as {queue_id} (HTTP 200 OK)")
    headers = request.headers
    assert headers["Content-Type"] == "message/rfc822"
    assert headers["X-Envelope-From"] == "a@example.org"
    assert headers.get_all("X-Envelope-To") == ["u@mx.test", "v@mx.test"]
    assert (headers["X-Client-IP"], headers["X-Helo"], headers["X-Auth-User"]) == (
        "127.0.0.2", "client.test", ""
    )  # fmt: skip
    assert request.verified
    assert abs(int(headers["X-Timestamp"]) - time.time()) < 60
    # the body is the message as stored: our Received field on top, then what was sent
    assert request.body.startswith(b"Received: from client.test")
    assert request.body.endswith(MESSAGE + b"\r\n")
    assert int(headers["Content-Length"]) == len(request.body)
    assert outcomes(server, "2xx") == 1
    assert server.extra["metrics"].registry.get_sample_value(
        "qpconn_queue_outcomes_total", {"plugin": "queue/http", "outcome": "queued"}
    ) == 1


@pytest_twisted.ensureDeferred
async def test_utf8_envelope_and_the_null_sender(app, deliver):
    reply, _ = await deliver(f"{app.url}/ok", rcpts=("josé@mx.test",),
                             mail="MAIL FROM:<> SMTPUTF8")  # fmt: skip
    assert reply.code == 250
    (request,) = app.requests
    assert request.headers["X-Envelope-From"] == ""
    raw = request.headers["X-Envelope-To"].encode("latin-1")  # the octets as sent
    assert raw.decode("utf-8") == "josé@mx.test"
    assert request.verified


@pytest_twisted.ensureDeferred
async def test_4xx_refuses_with_the_applications_reason(app, deliver):
    app.body = b"5.1.1 No such mailbox: u@mx.test\r\nmore detail on a second line\r\n"
    reply, server = await deliver(f"{app.url}/status/404")
    assert (reply.code, reply.text) == (550, "5.1.1 No such mailbox: u@mx.test")
    app.body = b"\r\n  go away \x1b[31m\xff now\n"  # sanitised: printable ASCII only
    reply, _ = await deliver(f"{app.url}/status/403")
    assert (reply.code, reply.text) == (550, "5.7.1 go away ?[31m? now")
    app.body = b""
    reply, _ = await deliver(f"{app.url}/status/400")
    assert (reply.code, reply.text) == (550, "5.7.1 Refused (HTTP 400 Bad Request)")
    # HTTP's own temporary 4xx
    reply, _ = await deliver(f"{app.url}/status/429")
    assert (reply.code, reply.text) == (
        451, "4.3.0 The application answered HTTP 429 Too Many Requests; try again later"
    )  # fmt: skip
    assert outcomes(server, "4xx") == 1


@pytest_twisted.ensureDeferred
async def test_the_status_decides_even_when_the_body_never_ends(app, deliver):
    app.body = b"5.7.1 not for us\r\nand the rest never comes"
    # A refusal's text is read from the body until timeout=1 (not the 30 s default) ends it;
    # the status still decides: 550, where a timeout alone would have been a 451.
    began = time.monotonic()
    reply, _ = await deliver(f"{app.url}/unfinished/403", "timeout=1")
    assert (reply.code, reply.text) == (550, "5.7.1 not for us")
    assert time.monotonic() - began < 15
    # A 2xx status is enough: no wait for the body, up to half of the 30 s timeout.
    began = time.monotonic()
    reply, _ = await deliver(f"{app.url}/unfinished/201", "timeout=30")
    assert (reply.code, reply.text[-18:]) == (250, "(HTTP 201 Created)")
    assert time.monotonic() - began < 15


@pytest_twisted.ensureDeferred
async def test_a_signature_made_with_another_secret_does_not_verify(app, deliver, tmp_path):
    reply, _ = await deliver(f"{app.url}/verify")
    assert reply.code == 250 and app.requests[-1].verified
    reply, _ = await deliver(f"{app.url}/verify", "secret=not-the-shared-secret-at-all")
    assert (reply.code, reply.text) == (550, "5.7.1 bad signature")
    assert not app.requests[-1].verified


@pytest_twisted.ensureDeferred
async def test_5xx_a_hang_and_a_refused_connection_give_451(app, deliver):
    app.body = b"Traceback (most recent call last):\n"
    reply, server = await deliver(f"{app.url}/status/500")
    assert (reply.code, reply.text) == (
        451, "4.3.0 The application answered HTTP 500 Internal Server Error; try again later"
    )  # fmt: skip
    assert outcomes(server, "5xx") == 1
    began = time.monotonic()
    reply, server = await deliver(f"{app.url}/hang", "timeout=1")
    # timeout=1, not the 30 s default
    assert_within_timeout(time.monotonic() - began, fired=1.0, instead_of=30)
    where = app.url.removeprefix("http://")
    assert (reply.code, reply.text) == (
        451, f"4.4.1 {where} unavailable (no answer within 1s); try again later"
    )  # fmt: skip
    assert outcomes(server, "timeout") == 1
    port = free_port()
    reply, server = await deliver(f"http://127.0.0.1:{port}/mail")
    assert (reply.code, reply.text) == (
        451, f"4.4.1 127.0.0.1:{port} unavailable (connection refused); try again later"
    )  # fmt: skip
    assert outcomes(server, "refused") == 1


def documented_verify() -> Any:
    """The ``verify`` function docs/config.md gives applications, as written there."""
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    section = text[text.index("### `queue/http") :]
    code = section[section.index("```python\n") + 10 : section.index("```\n\n**The answer**")]
    scope: dict[str, Any] = {}
    exec(compile(code, "docs/config.md", "exec"), scope)
    return scope["verify"]


@pytest_twisted.ensureDeferred
async def test_the_documented_check_verifies_our_requests(app, deliver):
    two = ("u@mx.test", "v@mx.test")
    await deliver(f"{app.url}/ok", "secret=0123456789abcdef-other", rcpts=two)
    await deliver(f"{app.url}/ok", rcpts=two)
    verify = documented_verify()
    wrong, right = app.requests
    assert not verify(SECRET, wrong.headers, wrong.body)
    assert verify(SECRET, right.headers, right.body)
    assert not verify(SECRET, right.headers, right.body + b"x")  # the body is covered
    right.headers.replace_header("X-Envelope-To", "attacker@example.net")
    assert not verify(SECRET, right.headers, right.body)  # and the envelope


def test_arguments(tmp_path):
    (tmp_path / "short").write_text("tiny\n")
    good = "secret=0123456789abcdef"
    for args in [(), ("secret=0123456789abcdef",), ("ftp://x/", good), ("http:///x", good),
                 ("http://127.0.0.1/",), ("http://127.0.0.1/", "secret=short"),
                 ("http://127.0.0.1/", f"secret_file={tmp_path / 'short'}"),
                 ("http://127.0.0.1/", good, "timeout=0"), ("http://127.0.0.1/", good, "x=1"),
                 ("http://127.0.0.1/", f"secret_file={tmp_path / 'missing'}"),
                 ("http://127.0.0.1/", good, f"secret_file={tmp_path / 'short'}")]:  # fmt: skip
        with pytest.raises(PluginLoadError):
            load_plugin(Config(None), "queue/http", *args)
    plugin = load_plugin(Config(None), "queue/http", "https://u:p@app.example:8443/in", good)
    assert plugin.where == "app.example:8443" and plugin.timeout == 35.0
