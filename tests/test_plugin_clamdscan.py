"""virus/clamdscan end to end: a real qpconn streaming mail to Debian's real clamd on
loopback (TCP and its unix socket), with a signature database of one test signature the
test writes itself (no download); a fake clamd only for the ERROR answer a healthy one
cannot be made to give."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.kit.scanclient import ScanError
from qpconn.plugins import PluginLoadError, load_plugin
from qpconn.plugins.virus.clamdscan import CHUNK, instream, parse_answer
from tests.e2e_client import watch_errors
from tests.support.mail import header_fields
from tests.support.process import free_port
from tests.support.scanners import (
    CLAMD_STREAM_MAX,
    CLAMD_TEST_STRING,
    CLAMD_TEST_VIRUS,
    ClamdFault,
    PeerUnavailable,
    RealDaemon,
    deliver,
    start_real_clamd,
)
from tests.support.scanners import scanning_server as start

CLEAN = b"From: a@example.org\r\nSubject: report\r\n\r\nThe figures are attached.\r\n"
INFECTED = (
    b"From: a@example.org\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain\r\n\r\n" + CLAMD_TEST_STRING + b"\r\n"
)
#: 2 x CHUNK and more: three chunks on the wire, the signature in the last one
BIG = CLEAN + (b"x" * 78 + b"\r\n") * (2 * CHUNK // 80) + CLAMD_TEST_STRING + b"\r\n"
UNAVAILABLE = (451, "4.7.1 Virus scanner unavailable; try again later")
#: half of what the two deliveries below would take if the plugin's 0.5 s timeout were
#: ignored: the hook's own limit (scan timeout + 10 s = 10.5 s) twice
HOOK_LIMIT = 2 * 10.5 / 2


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: Any) -> Iterator[RealDaemon]:
    try:
        daemon = start_real_clamd(str(tmp_path_factory.mktemp("clamd")))
    except PeerUnavailable as exc:
        pytest.skip(f"real clamd unavailable: {exc}")
    yield daemon
    daemon.stop()


@pytest_twisted.async_yield_fixture
async def broken_clamd() -> AsyncIterator[ClamdFault]:
    server = ClamdFault()
    yield server
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_the_test_signature_is_refused_clean_mail_marked(qpconn_server, clamd):
    server = start(qpconn_server, f"virus/clamdscan clamd_socket {clamd.address}")
    reply = await deliver(server, INFECTED)
    assert (reply.code, reply.text) == (552, f"5.7.0 Virus found: {CLAMD_TEST_VIRUS}")
    assert (await deliver(server, CLEAN)).code == 250
    (message,) = server.messages()
    assert header_fields(message)[0] == b"X-Virus-Checked: Checked by ClamAV on mx.test"
    results = [server.extra["sessions"].of("virus/clamdscan", n)[0] for n in (0, 1)]
    assert [(v["result"], v["reason"]) for v in results] == [
        ("infected", CLAMD_TEST_VIRUS), ("clean", "no virus found")]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_big_messages_go_whole_over_the_unix_socket_and_the_size_limit(qpconn_server, clamd):
    # clamd finds the signature in the last of three chunks: every chunk reached it
    server = start(qpconn_server, f"virus/clamdscan clamd_socket unix:{clamd.unix_path}")
    reply = await deliver(server, BIG)
    assert (reply.code, reply.text) == (552, f"5.7.0 Virus found: {CLAMD_TEST_VIRUS}")
    # over clamd's StreamMaxLength: clamd refuses the stream, the plugin's on_error decides
    too_big = BIG + (b"y" * 78 + b"\r\n") * (CLAMD_STREAM_MAX // 80)
    server = start(qpconn_server, f"virus/clamdscan clamd_socket {clamd.address}")
    assert (await deliver(server, too_big)).code == UNAVAILABLE[0]
    (verdict,) = server.extra["sessions"].of("virus/clamdscan")
    assert "size limit exceeded" in verdict["reason"]
    # over the plugin's own max_size: not sent at all, let through unscanned
    server = start(qpconn_server, f"virus/clamdscan clamd_socket {clamd.address} max_size 900")
    assert (await deliver(server, BIG)).code == 250
    assert server.extra["sessions"].of("virus/clamdscan")[0]["result"] == "skip"


@pytest.mark.parametrize("mode", ["hang", "error", "down"])
@pytest_twisted.ensureDeferred
async def test_a_failing_clamd_gives_the_configured_action(
    qpconn_server, clamd, broken_clamd, mode
):
    # hang: the real clamd, paused (SIGSTOP: it accepts through the kernel, never answers);
    # error: the fake; down: a port nobody listens on
    address = {"hang": clamd.address, "error": broken_clamd.address,
               "down": f"127.0.0.1:{free_port()}"}[mode]  # fmt: skip
    line = f"virus/clamdscan clamd_socket {address} timeout 0.5"
    if mode == "hang":
        clamd.process.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        server = start(qpconn_server, line)
        reply = await deliver(server, CLEAN)
        assert (reply.code, reply.text) == UNAVAILABLE
        server = start(qpconn_server, line + " on_error accept")
        assert (await deliver(server, INFECTED)).code == 250
        # the 0.5 s timeout twice, not plugin_timeout twice
        assert time.monotonic() - began < HOOK_LIMIT
    finally:
        clamd.process.send_signal(signal.SIGCONT)
    (message,) = server.messages()
    assert not any(f.startswith(b"X-Virus-Checked") for f in header_fields(message))
    (verdict,) = server.extra["sessions"].of("virus/clamdscan")
    assert (verdict["result"], verdict["action"]) == ("temperror", "accept")
    if mode == "error":
        assert broken_clamd.received[-1].endswith(CLAMD_TEST_STRING + b"\r\n\r\n")


def test_protocol_pieces():
    assert b"".join(instream(b"abc", chunk=2)) == (
        b"zINSTREAM\0\0\0\0\x02ab\0\0\0\x01c\0\0\0\0"
    )
    # a big message goes in CHUNK-sized pieces, each with its length first
    sizes = [len(piece) for piece in instream(b"x" * (2 * CHUNK + 5))]
    assert sizes == [len(b"zINSTREAM\0"), 4 + CHUNK, 4 + CHUNK, 4 + 5, 4]
    assert parse_answer(b"stream: OK\0") is None
    assert parse_answer(b"stream: Win.Test.EICAR_HDB-1 FOUND\0") == "Win.Test.EICAR_HDB-1"
    for bad in (b"", b"PONG\0", b"stream: Access denied. ERROR\0"):
        with pytest.raises(ScanError):
            parse_answer(bad)
    for args in (("clamd_socket", "host"), ("on_error", "ignore"), ("timeout", "soon")):
        with pytest.raises(PluginLoadError):
            load_plugin(Config(None), "virus/clamdscan", *args)
