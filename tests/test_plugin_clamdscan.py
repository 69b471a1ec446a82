"""virus/clamdscan end to end: a real qpconn streaming mail to a clamd-protocol server on
loopback that flags the EICAR test string (clamd's databases cannot be downloaded here)."""

from __future__ import annotations

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
from tests.support.scanners import EICAR, ClamdTestServer, deliver
from tests.support.scanners import scanning_server as start

CLEAN = b"From: a@example.org\r\nSubject: report\r\n\r\nThe figures are attached.\r\n"
INFECTED = (
    b"From: a@example.org\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain\r\n\r\n" + EICAR + b"\r\n"
)


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest_twisted.async_yield_fixture
async def clamd() -> AsyncIterator[ClamdTestServer]:
    server = ClamdTestServer()
    yield server
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_eicar_is_refused_clean_mail_marked(qpconn_server, clamd):
    server = start(qpconn_server, f"virus/clamdscan clamd_socket {clamd.address}")
    reply = await deliver(server, INFECTED)
    assert (reply.code, reply.text) == (552, "5.7.0 Virus found: Eicar-Test-Signature")
    assert (await deliver(server, CLEAN)).code == 250
    (message,) = server.messages()
    assert header_fields(message)[0] == b"X-Virus-Checked: Checked by ClamAV on mx.test"
    assert EICAR in clamd.received[0] and clamd.received[1].endswith(b"attached.\r\n\r\n")
    results = [server.extra["sessions"].of("virus/clamdscan", n)[0] for n in (0, 1)]
    assert [(v["result"], v["reason"]) for v in results] == [
        ("infected", "Eicar-Test-Signature"), ("clean", "no virus found")]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_big_messages_go_in_chunks_over_a_unix_socket(qpconn_server, tmp_path):
    clamd = ClamdTestServer(str(tmp_path / "clamd.ctl"))
    try:
        server = start(qpconn_server, f"virus/clamdscan clamd_socket unix:{clamd.address}")
        big = CLEAN + (b"x" * 78 + b"\r\n") * (2 * CHUNK // 80) + EICAR + b"\r\n"
        assert (await deliver(server, big)).code == 552
        assert len(clamd.chunks) == 3 and clamd.chunks[:2] == [CHUNK, CHUNK]
        assert EICAR in clamd.received[0]
        clamd.max_stream = 1000  # clamd's StreamMaxLength
        server = start(qpconn_server, f"virus/clamdscan clamd_socket {clamd.address}")
        reply = await deliver(server, big)
        assert (reply.code, reply.text) == (451, "4.7.1 Virus scanner unavailable; try again later")
        (verdict,) = server.extra["sessions"].of("virus/clamdscan")
        assert "size limit exceeded" in verdict["reason"]
        server = start(qpconn_server, f"virus/clamdscan clamd_socket {clamd.address} max_size 900")
        assert (await deliver(server, big)).code == 250  # too big to scan: let through
        assert server.extra["sessions"].of("virus/clamdscan")[0]["result"] == "skip"
    finally:
        await clamd.stop()


@pytest.mark.parametrize("mode", ["hang", "error", "down"])
@pytest_twisted.ensureDeferred
async def test_a_failing_clamd_gives_the_configured_action(qpconn_server, clamd, mode):
    clamd.mode = mode
    address = clamd.address
    if mode == "down":
        await clamd.stop()
    line = f"virus/clamdscan clamd_socket {address} timeout 0.5"
    began = time.monotonic()
    server = start(qpconn_server, line)
    reply = await deliver(server, CLEAN)
    assert (reply.code, reply.text) == (451, "4.7.1 Virus scanner unavailable; try again later")
    server = start(qpconn_server, line + " on_error accept")
    assert (await deliver(server, INFECTED)).code == 250
    assert time.monotonic() - began < 8  # without the 0.5 s timeout: 2 x 10.5 s (the hook limit)
    (message,) = server.messages()
    assert not any(f.startswith(b"X-Virus-Checked") for f in header_fields(message))
    (verdict,) = server.extra["sessions"].of("virus/clamdscan")
    assert (verdict["result"], verdict["action"]) == ("temperror", "accept")


def test_protocol_pieces():
    assert b"".join(instream(b"abc", chunk=2)) == (
        b"zINSTREAM\0\0\0\0\x02ab\0\0\0\x01c\0\0\0\0"
    )
    assert parse_answer(b"stream: OK\0") is None
    assert parse_answer(b"stream: Win.Test.EICAR_HDB-1 FOUND\0") == "Win.Test.EICAR_HDB-1"
    for bad in (b"", b"PONG\0", b"stream: Access denied. ERROR\0"):
        with pytest.raises(ScanError):
            parse_answer(bad)
    for args in (("clamd_socket", "host"), ("on_error", "ignore"), ("timeout", "soon")):
        with pytest.raises(PluginLoadError):
            load_plugin(Config(None), "virus/clamdscan", *args)
