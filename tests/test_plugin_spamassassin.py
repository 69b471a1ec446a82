"""spamassassin end to end: a real qpconn talking the spamd protocol to Debian's real spamd,
once with SpamAssassin's own rules (GTUBE) and once with a few rules of the test's own
(tests/support/scanners.py SPAMD_RULES), over TCP and its unix socket; a fake spamd only
for the faults a working one does not show (hanging, an error answer, not spamd at all)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from tests.e2e_client import watch_errors
from tests.support.mail import header_fields
from tests.support.process import free_port
from tests.support.scanners import (
    GTUBE,
    PeerUnavailable,
    RealDaemon,
    SpamdFault,
    deliver,
    start_real_spamd,
)
from tests.support.scanners import scanning_server as start
from tests.support.timing import wait_until

HAM = b"From: a@example.org\r\nSubject: lunch\r\n\r\nSee you at noon.\r\n"
SPAM = b"From: a@example.org\r\nSubject: offer\r\n\r\ncheap pills, act now\r\n"
GTUBE_MAIL = b"From: a@example.org\r\nSubject: test\r\n\r\n" + GTUBE + b"\r\n"
#: half of what the two deliveries would take if the 0.5 s timeout were ignored: the
#: hook's own limit (scan timeout + 10 s = 10.5 s) twice
HOOK_LIMIT = 2 * 10.5 / 2


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


def _real_spamd(tmp_path_factory: Any, rules: bool) -> Iterator[RealDaemon]:
    try:
        daemon = start_real_spamd(str(tmp_path_factory.mktemp("spamd")), rules=rules)
    except PeerUnavailable as exc:
        pytest.skip(f"real spamd unavailable: {exc}")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def spamd(tmp_path_factory: Any) -> Iterator[RealDaemon]:
    """Debian's spamd with the test's rules only: DRUGS_CHEAP 3.5, URGENT 2.0, ..."""
    yield from _real_spamd(tmp_path_factory, rules=True)


@pytest.fixture(scope="module")
def real_spamd(tmp_path_factory: Any) -> Iterator[RealDaemon]:
    """Debian's spamd with SpamAssassin's installed rules."""
    yield from _real_spamd(tmp_path_factory, rules=False)


def spam_fields(message: bytes) -> list[bytes]:
    return [f for f in header_fields(message) if f.startswith(b"X-Spam-")]


@pytest_twisted.ensureDeferred
async def test_scores_land_in_x_spam_headers(qpconn_server, spamd):
    server = start(qpconn_server, f"spamassassin spamd_socket {spamd.address} spamd_user mail")
    forged = b"X-Spam-Status: No, score=-100\r\nX-Spam-Flag: NO\r\n" + SPAM
    for text in (HAM, forged):
        assert (await deliver(server, text)).code == 250
    ham, spam = server.messages()
    # QPCONN_RECEIVED: spamd saw our Received field; no FORGED_STATUS (50 points): the forged
    # field was removed before the scan
    assert spam_fields(ham) == [b"X-Spam-Status: No, score=0.0 required=5.0 tests=QPCONN_RECEIVED",
                                b"X-Spam-Level: "]  # fmt: skip
    assert spam_fields(spam) == [
        b"X-Spam-Flag: YES",
        b"X-Spam-Status: Yes, score=5.5 required=5.0 tests=DRUGS_CHEAP,QPCONN_RECEIVED,URGENT",
        b"X-Spam-Level: *****",
    ]
    verdicts = [server.extra["sessions"].of("spamassassin", n)[0] for n in (0, 1)]
    assert [(v["result"], v["reason"]) for v in verdicts] == [
        ("ham", "score 0 required 5"), ("spam", "score 5.5 required 5")]  # fmt: skip
    # spamd scanned them for the user named (its log: "result: ... user=mail")
    assert wait_until(lambda: read(spamd.log).count(",user=mail,") >= 2), read(spamd.log)


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


@pytest_twisted.ensureDeferred
async def test_reject_threshold(qpconn_server, spamd):
    server = start(qpconn_server, f"spamassassin spamd_socket {spamd.address} reject_threshold 5")
    reply = await deliver(server, SPAM)
    assert (reply.code, reply.text) == (550, "5.7.1 Spam score 5.5 exceeds the threshold")
    assert (await deliver(server, HAM)).code == 250
    assert len(server.messages()) == 1


@pytest_twisted.async_yield_fixture
async def broken_spamd() -> AsyncIterator[SpamdFault]:
    server = SpamdFault("hang")
    yield server
    await server.stop()


@pytest.mark.parametrize("mode", ["hang", "error", "garbage", "down"])
@pytest_twisted.ensureDeferred
async def test_a_failing_spamd_gives_the_configured_action(qpconn_server, broken_spamd, mode):
    broken_spamd.mode = mode
    address = f"127.0.0.1:{free_port()}" if mode == "down" else broken_spamd.address
    line = f"spamassassin spamd_socket {address} timeout 0.5"
    began = time.monotonic()
    server = start(qpconn_server, line)
    assert (await deliver(server, SPAM)).code == 250
    (message,) = server.messages()
    assert spam_fields(message) == []
    server = start(qpconn_server, line + " on_error tempfail")
    reply = await deliver(server, SPAM)
    assert (reply.code, reply.text) == (451, "4.7.1 Spam scanner unavailable; try again later")
    assert time.monotonic() - began < HOOK_LIMIT  # the 0.5 s timeout, not the hook's limit
    (verdict,) = server.extra["sessions"].of("spamassassin")
    assert (verdict["result"], verdict["action"]) == ("temperror", "tempfail")
    if mode != "down":  # it was asked the way spamd is asked, with the whole message
        command, headers, body = broken_spamd.received[-1]
        assert command == "SYMBOLS SPAMC/1.5" and int(headers["content-length"]) == len(body)
        assert body.startswith(b"Received: from ") and b"\r\n\r\ncheap pills, act now\r\n" in body


@pytest_twisted.ensureDeferred
async def test_unix_socket_and_max_size(qpconn_server, spamd):
    server = start(qpconn_server, f"spamassassin spamd_socket {spamd.unix_path}")
    assert (await deliver(server, SPAM)).code == 250
    assert b"X-Spam-Flag: YES" in header_fields(server.messages()[0])
    server = start(qpconn_server, f"spamassassin spamd_socket {spamd.unix_path} max_size 100")
    assert (await deliver(server, SPAM + b"x" * 100)).code == 250
    # too big to be sent: spam, but no verdict in the header (the maildir is shared: the
    # newest message is this one)
    assert len(server.messages()) == 2 and spam_fields(server.messages()[-1]) == []


def test_arguments():
    for args in (("spamd_socket", "nowhere"), ("on_error", "maybe"), ("timeout", "x"),
                 ("spamd_user", "a b;c")):  # fmt: skip
        with pytest.raises(PluginLoadError):
            load_plugin(Config(None), "spamassassin", *args)


@pytest_twisted.ensureDeferred
async def test_debians_spamd_flags_gtube(qpconn_server, real_spamd):
    line = f"spamassassin spamd_socket {real_spamd.address} reject_threshold 100"
    server = start(qpconn_server, line)
    reply = await deliver(server, GTUBE_MAIL)
    assert reply.code == 550 and reply.text.startswith("5.7.1 Spam score 10")
    assert (await deliver(server, HAM)).code == 250
    (message,) = server.messages()
    status = next(f for f in spam_fields(message) if f.startswith(b"X-Spam-Status"))
    assert b"required=5.0" in status and b"GTUBE" not in status


@pytest_twisted.ensureDeferred
async def test_subject_tagged_above_munge_subject_threshold(qpconn_server, spamd):
    line = f"spamassassin spamd_socket {spamd.address} munge_subject_threshold 5"
    server = start(qpconn_server, line + " subject_prefix [SPAM]")
    body = b"\r\n\r\ncheap pills, act now\r\n"
    texts = [
        HAM,
        SPAM,
        b"From: a@example.org\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n deals" + body,  # folded
        b"From: a@example.org\r\nSubject: [SPAM] offer" + body,  # tagged already
        b"From: a@example.org" + body,  # no Subject at all
    ]
    for text in texts:
        assert (await deliver(server, text)).code == 250
    subjects = [
        [f for f in header_fields(m) if f.lower().startswith(b"subject:")]
        for m in server.messages()
    ]
    assert subjects == [[b"Subject: lunch"], [b"Subject: [SPAM] offer"],
                        [b"Subject: [SPAM] =?utf-8?q?caf=C3=A9?= deals"],
                        [b"Subject: [SPAM] offer"], [b"Subject: [SPAM]"]]  # fmt: skip
    assert b"Subject: [SPAM] =?utf-8?q?caf=C3=A9?=\n deals\n" in server.messages()[2]
    server = start(qpconn_server, line)  # the default prefix, qpsmtpd's
    assert (await deliver(server, SPAM)).code == 250
    assert b"\nSubject: *** SPAM *** offer\n" in server.messages()[-1]
    server = start(qpconn_server, f"spamassassin spamd_socket {spamd.address}")
    assert (await deliver(server, SPAM)).code == 250  # without the option: untouched
    assert b"\nSubject: offer\n" in server.messages()[-1]
