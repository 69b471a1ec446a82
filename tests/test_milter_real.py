"""The milter plugin against real milters from Debian, started by the tests on loopback
(tests/support/milters.py): OpenDKIM signs and verifies, rspamd rejects GTUBE and adds
its headers to clean mail. Each skips with the reason when its milter is not installed
or does not come up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from tests.e2e_client import watch_errors
from tests.support.mail import header_fields
from tests.support.milters import RunningMilter, skipped, start_opendkim, start_rspamd
from tests.support.policy import codes, script
from tests.support.scanners import GTUBE
from tests.support.server import in_thread

MESSAGE = (
    b"From: Alice <a@example.org>\r\nTo: u@mx.test\r\nSubject: lunch tomorrow\r\n"
    b"Date: Mon, 07 Dec 2026 12:00:00 +0000\r\nMessage-ID: <lunch.1@example.org>\r\n\r\n"
    b"Shall we meet at noon, at the usual place?\r\nAlice"
)


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture
def verdicts() -> Iterator[list[str]]:
    """The milter plugin's verdict lines, to show when an assertion fails."""
    found: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("event") == "milter":
            found.append(f"{event['stage']}: {event['verdict']}{event['why']} {event['reply']}")

    globalLogPublisher.addObserver(observer)
    yield found
    globalLogPublisher.removeObserver(observer)


def running(name: str, started: RunningMilter | None) -> Iterator[RunningMilter]:
    if started is None:
        pytest.skip(skipped[name])
    yield started
    started.stop()


@pytest.fixture(scope="module")
def opendkim(tmp_path_factory: Any) -> Iterator[RunningMilter]:
    yield from running("opendkim", start_opendkim(str(tmp_path_factory.mktemp("opendkim"))))


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: Any) -> Iterator[RunningMilter]:
    yield from running("rspamd", start_rspamd(str(tmp_path_factory.mktemp("rspamd"))))


def milter_server(qpconn_server: Any, milter: RunningMilter) -> Any:
    line = f"milter {milter.address} content_timeout 60"
    return qpconn_server(plugins=["relay", line, "rcpt_ok", "queue/maildir maildir"])


async def send(server: Any, text: bytes, source: str) -> list[Any]:
    commands = ["EHLO client.test", "MAIL FROM:<a@example.org>", "RCPT TO:<u@mx.test>", "DATA",
                text]  # fmt: skip
    replies = await in_thread(script, server.address, source, commands)
    await server.wait_sessions_closed()
    return replies


def as_sent(message: bytes) -> bytes:
    """A delivered message without the Maildir's fields and our Received, to send again.

    The Maildir stores LF line endings; the wire (and the body hash) wants CRLF back.
    """
    body = message.split(b"\n\n", 1)[1]
    fields = [f for f in header_fields(message) if not f.startswith(b"Received:")]
    text = b"\n".join(fields) + b"\n\n" + body.removesuffix(b"\n")
    return text.replace(b"\n", b"\r\n")


@pytest_twisted.ensureDeferred
async def test_opendkim_signs_mail_from_an_internal_host(qpconn_server, opendkim):
    server = milter_server(qpconn_server, opendkim)
    assert codes(await send(server, MESSAGE, "127.0.0.1"))[-1] == 250
    (message,) = server.messages()
    (signature,) = [f for f in header_fields(message) if f.startswith(b"DKIM-Signature:")]
    assert b"d=example.org" in signature and b"s=test" in signature
    assert b"Authentication-Results" not in message  # signed, not verified


@pytest_twisted.ensureDeferred
async def test_opendkim_verifies_a_signed_message(qpconn_server, opendkim):
    signer = milter_server(qpconn_server, opendkim)
    assert codes(await send(signer, MESSAGE, "127.0.0.1"))[-1] == 250
    signed = as_sent(signer.messages()[-1])
    verifier = qpconn_server(plugins=["relay", f"milter {opendkim.address}", "rcpt_ok",
                                      "queue/maildir verified"])  # fmt: skip
    assert codes(await send(verifier, signed, "127.0.0.2"))[-1] == 250
    tampered = signed.replace(b"at noon", b"at two")
    assert codes(await send(verifier, tampered, "127.0.0.2"))[-1] == 250
    results = []
    new = os.path.join("verified", "new")
    for name in sorted(os.listdir(new), key=lambda n: os.stat(os.path.join(new, n)).st_mtime_ns):
        with open(os.path.join(new, name), "rb") as handle:
            fields = header_fields(handle.read())
        (field,) = [f for f in fields if f.startswith(b"Authentication-Results:")]
        results.append(field)
    good, bad = results
    # the authserv-id is the MTA's name, which OpenDKIM takes from the "j" macro
    assert good.startswith(b"Authentication-Results: mx.test;") and b"dkim=pass" in good
    assert b"header.d=example.org" in good
    assert b"dkim=fail" in bad


@pytest_twisted.ensureDeferred
async def test_rspamd_rejects_gtube(qpconn_server, rspamd, verdicts):
    server = milter_server(qpconn_server, rspamd)
    text = MESSAGE.replace(b"Shall we meet", GTUBE + b"\r\nShall we meet")
    replies = await send(server, text, "127.0.0.2")
    reply = (replies[-1].code, replies[-1].text)
    # rspamd's own reply text ("554 5.7.1 Gtube pattern"), at qpconn's data_post code
    assert reply == (552, "5.7.1 Gtube pattern"), (verdicts, rspamd.output()[-3000:])
    assert server.messages() == []


@pytest_twisted.ensureDeferred
async def test_rspamd_adds_its_headers_to_a_clean_message(qpconn_server, rspamd, verdicts):
    server = milter_server(qpconn_server, rspamd)
    replies = await send(server, MESSAGE, "127.0.0.2")
    assert replies[-1].code == 250, (replies, verdicts, rspamd.output()[-3000:])
    (message,) = server.messages()
    names = {f.split(b":", 1)[0] for f in header_fields(message)}
    assert {b"X-Spamd-Result", b"X-Rspamd-Server", b"X-Rspamd-Queue-Id"} <= names, names
