"""rspamd end to end: a real qpconn asking Debian's real rspamd (started offline by the test,
tests/support/rspamdserver.py) over rspamd's HTTP protocol, and doing what it answers."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from qpconn.app.metrics import ServerMetrics
from qpconn.config import Config
from qpconn.plugins import Plugin, PluginLoadError, load_plugin
from tests.e2e_client import watch_errors
from tests.support.docs import plugins_example
from tests.support.mail import header_fields
from tests.support.nexthop import ScriptedServer
from tests.support.policy import sessions_plugin
from tests.support.rspamdserver import real_rspamd, rspamd_usable
from tests.support.scanners import GTUBE, deliver
from tests.support.server import in_thread

DATE = b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\n"


def mail(subject: str, body: bytes = b"See you at noon.\r\n", extra: bytes = b"") -> bytes:
    return (
        b"From: a@example.org\r\nTo: u@mx.test\r\n"
        + f"Subject: {subject}\r\nMessage-ID: <{subject}@example.org>\r\n".encode()
        + DATE
        + extra
        + b"\r\n"
        + body
    )


HAM = mail("lunch")
GTUBE_MAIL = mail("test", GTUBE + b"\r\n")


class KeepNotes(Plugin):
    """Keeps each transaction's ``notes["rspamd"]``, refused ones included."""

    def register(self) -> None:
        self.notes: list[Any] = []

    def hook_reset_transaction(self, transaction: Any) -> None:
        self.notes.append(transaction.notes.get("rspamd"))


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture
def outcomes() -> Iterator[list[dict[str, Any]]]:
    """Every ``plugin_outcome`` log event: the plugin's one line per message."""
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("event") == "plugin_outcome":
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


@pytest.fixture(scope="module")
def rspamd_cache(tmp_path_factory: Any) -> str:
    reason = rspamd_usable()
    if reason:
        pytest.skip(reason)
    return str(tmp_path_factory.mktemp("rspamd-hs"))


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: Any, rspamd_cache: str) -> Iterator[Any]:
    try:
        with real_rspamd(str(tmp_path_factory.mktemp("rspamd")), rspamd_cache) as instance:
            yield instance
    except RuntimeError as exc:
        pytest.skip(str(exc))


def start(qpconn_server: Any, line: str) -> Any:
    """rcpt_ok, the rspamd line, a Maildir; ``extra`` holds the notes and verdicts kept."""
    notes, sessions = KeepNotes(Config(None), "keep"), sessions_plugin()
    server = qpconn_server(plugins=["rcpt_ok", line, "queue/maildir maildir", notes, sessions])
    server.extra.update(notes=notes.notes, sessions=sessions)
    return server


def wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest_twisted.ensureDeferred
async def test_gtube_is_refused_with_rspamds_message(qpconn_server, rspamd, outcomes):
    server = start(qpconn_server, f"rspamd host=127.0.0.1 port={rspamd.port} timeout=15")
    reply = await deliver(server, GTUBE_MAIL)
    assert (reply.code, reply.text) == (550, "5.7.1 Gtube pattern")
    assert server.messages() == []
    (note,) = server.extra["notes"]
    assert note["action"] == "reject" and "GTUBE" in note["symbols"]
    assert note["message"] == "Gtube pattern"
    (line,) = [e for e in outcomes if e["plugin"] == "rspamd"]
    assert line["outcome"] == "reject" and "GTUBE" in line["detail"]
    (verdict,) = server.extra["sessions"].of("rspamd")
    assert (verdict["result"], verdict["action"]) == ("spam", "reject")


@pytest_twisted.ensureDeferred
async def test_clean_message_is_accepted_with_rspamds_headers(qpconn_server, rspamd, outcomes):
    server = start(qpconn_server, f"rspamd port {rspamd.port}")
    forged = b"X-Spam: Yes\r\nX-Spamd-Result: default: False [-100 / 15.00]\r\n"
    reply = await deliver(server, mail("lunch", extra=forged))
    assert reply.code == 250, reply
    (stored,) = server.messages()
    fields = header_fields(stored)
    (note,) = server.extra["notes"]
    assert note["action"] == "no action" and note["score"] < note["required"]
    # the envelope reached rspamd: its symbols compare the header with it
    assert {"FROM_EQ_ENVFROM", "TO_MATCH_ENVRCPT_ALL"} <= set(note["symbols"])
    queue_id = re.search(rb"with ESMTP id (\S+)", stored).group(1).decode()
    assert f"X-Rspamd-Queue-Id: {queue_id}".encode() in fields
    assert b"X-Rspamd-Action: no action" in fields
    (result,) = [f for f in fields if f.startswith(b"X-Spamd-Result:")]
    assert b"-100" not in result and b"FROM_EQ_ENVFROM" in result  # rspamd's, not the forgery
    assert not [f for f in fields if f.startswith(b"X-Spam:")]
    (line,) = [e for e in outcomes if e["plugin"] == "rspamd"]
    assert line["outcome"] == "no_action" and "FROM_EQ_ENVFROM" in line["detail"]
    # rspamd's own log names the envelope it was given
    assert await in_thread(wait_for, lambda: f"qid: <{queue_id}>" in rspamd.log_text()), (
        rspamd.log_text()[-2000:]
    )
    text = rspamd.log_text()
    logged = text[text.index(f"qid: <{queue_id}>") :][:2000]  # its task line, several lines
    assert "ip: 127.0.0.2" in logged and "from: <a@example.org>" in logged
    assert "rcpts: <u@mx.test>" in logged


@pytest_twisted.ensureDeferred
async def test_each_action_of_rspamd_becomes_the_reply_or_the_header(qpconn_server, rspamd):
    server = start(qpconn_server, f"rspamd port={rspamd.port}")
    soft = await deliver(server, mail("qpconn-test-soft"))
    assert (soft.code, soft.text) == (451, "4.7.1 Not now, later")
    grey = await deliver(server, mail("qpconn-test-grey"))
    assert grey.code == 451 and grey.text.startswith("4.7.1 "), grey
    assert (await deliver(server, mail("qpconn-test-subject"))).code == 250
    assert (await deliver(server, mail("qpconn-test-header"))).code == 250
    rewritten, marked = server.messages()
    assert b"Subject: *** SPAM *** qpconn-test-subject" in header_fields(rewritten)
    assert b"X-Spam: Yes" in header_fields(rewritten)
    assert b"Subject: qpconn-test-header" in header_fields(marked)
    assert b"X-Spam: Yes" in header_fields(marked)
    assert b"X-Rspamd-Action: add header" in header_fields(marked)
    actions = [note["action"] for note in server.extra["notes"]]
    assert actions == ["soft reject", "greylist", "rewrite subject", "add header"]


@pytest_twisted.ensureDeferred
async def test_reject_0_marks_instead_of_refusing(qpconn_server, rspamd):
    server = start(qpconn_server, f"rspamd port {rspamd.port} reject 0")
    assert (await deliver(server, GTUBE_MAIL)).code == 250
    assert (await deliver(server, mail("qpconn-test-soft"))).code == 250
    gtube, soft = server.messages()
    assert b"X-Spam: Yes" in header_fields(gtube)
    assert not [f for f in header_fields(soft) if f.startswith(b"X-Spam:")]


@pytest_twisted.ensureDeferred
async def test_rspamd_killed_accepts_unscanned_by_default_or_tempfails(
    qpconn_server, tmp_path, rspamd_cache, outcomes
):
    try:
        context = real_rspamd(str(tmp_path / "rspamd"), rspamd_cache)
        own = context.__enter__()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        server = start(qpconn_server, f"rspamd port {own.port} timeout 10")
        metrics = ServerMetrics(server.factory).attach()
        assert (await deliver(server, HAM)).code == 250
        own.kill()
        assert (await deliver(server, HAM)).code == 250
        scanned, unscanned = server.messages()
        assert b"X-Rspamd-Action: no action" in header_fields(scanned)
        assert not [f for f in header_fields(unscanned) if f.startswith(b"X-Rspamd")]
        assert server.extra["notes"][1] is None
        (warning,) = [e for e in outcomes if e["outcome"] == "error"]
        assert warning["action"] == "accept" and f"127.0.0.1:{own.port}" in warning["address"]
        (verdict,) = server.extra["sessions"].of("rspamd")
        assert (verdict["result"], verdict["action"]) == ("temperror", "accept")
        counted = metrics.registry.get_sample_value(
            "qpconn_plugin_outcomes_total", {"plugin": "rspamd", "outcome": "error"}
        )
        assert counted == 1.0
        metrics.detach()
        strict = start(qpconn_server, f"rspamd port {own.port} on_error tempfail")
        reply = await deliver(strict, HAM)
        assert (reply.code, reply.text) == (451, "4.7.1 Spam scanner unavailable; try again later")
    finally:
        context.__exit__(None, None, None)


@pytest_twisted.ensureDeferred
async def test_rspamd_that_never_answers_is_given_up_after_timeout(qpconn_server, outcomes):
    with ScriptedServer(lambda sock: hung.hang(sock)) as hung:
        server = start(qpconn_server, f"rspamd port {hung.port} timeout 1 on_error tempfail")
        began = time.monotonic()
        reply = await deliver(server, HAM)
    assert reply.code == 451 and time.monotonic() - began < 10
    (warning,) = [e for e in outcomes if e["outcome"] == "error"]
    assert warning["error"] == "no answer within 1 s"
    assert hung.accepted == 1


@pytest.mark.parametrize(
    "args, problem",
    [
        (["bogus=1"], "unknown argument 'bogus'"),
        (["on_error", "maybe"], "on_error must be one of accept|tempfail"),
        (["port"], "'port' needs a value"),
        (["port=x"], "port must be a number"),
        (["timeout=0"], "timeout must be positive"),
    ],
)
def test_bad_arguments_stop_the_start(args, problem):
    with pytest.raises(PluginLoadError, match=problem):
        load_plugin(Config(None), "rspamd", *args)


def test_both_argument_forms_and_unix_socket():
    assert load_plugin(Config(None), "rspamd", "host=::1", "port=11333").address == "[::1]:11333"
    assert load_plugin(Config(None), "rspamd", "socket", "/run/rspamd.sock").address == (
        "/run/rspamd.sock"
    )


@pytest_twisted.ensureDeferred
async def test_the_documented_config_line_works(qpconn_server, rspamd):
    lines = plugins_example("rspamd")
    assert "rspamd host=127.0.0.1 port=11333 timeout=15" in lines
    # as written, but at the port this test's rspamd listens on
    server = qpconn_server(plugins=[line.replace("11333", str(rspamd.port)) for line in lines])
    reply = await deliver(server, GTUBE_MAIL)
    assert (reply.code, reply.text) == (550, "5.7.1 Gtube pattern")
    assert (await deliver(server, HAM)).code == 250
