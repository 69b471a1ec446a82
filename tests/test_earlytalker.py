"""The earlytalker plugin end to end: clients that speak before the greeting.

The server reads the socket while the greeting is held back (an ordinary hook pauses
reading), so bytes sent early are noticed; the plugin refuses at connect or, with
``defer-reject 1``, at MAIL.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from qpconn.server.factory import SMTPFactory
from qpconn.server.guard import EARLY_TALK_BUFFER
from qpconn.server.proxy import ProxySettings
from tests.e2e_client import Client, watch_errors
from tests.support.server import in_thread, read_replies, reply_codes
from tests.support.timing import wait_until

WAIT = "0.3"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


def start(qpconn_server: Any, *args: str, files: dict[str, Any] | None = None, **kw: Any) -> Any:
    line = " ".join(("earlytalker", "wait", WAIT, *args))
    return qpconn_server(
        files=files, plugins=["relay", line, "rcpt_ok", "queue/discard"], **kw
    )


def talk_first(
    address: tuple[str, int], early: bytes, later: bytes = b"", replies: int | None = None
) -> bytes:
    """Send ``early`` right after connecting, then ``later`` once a reply came back; read
    until ``replies`` replies in all (None: until the server closes the connection).

    ``early`` goes out as soon as ``connect()`` returns, before the server has even
    accepted, so it is early however slow the machine: the hold starts after the accept.
    """
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(early)
        data = read_replies(sock, 1)
        if later:
            sock.sendall(later)
        more = None if replies is None else replies - len(reply_codes(data))
        return data + read_replies(sock, more)


def codes(data: bytes) -> list[bytes]:
    """The code of each reply, with the enhanced code of refusals (``550 5.7.1``)."""
    found = []
    for line in data.split(b"\r\n"):
        if line[3:4] == b" ":
            found.append(line[:9] if line[:1] in b"45" else line[:3])
    return found


@pytest_twisted.ensureDeferred
async def test_early_talker_is_refused_at_connect_with_deny(qpconn_server):
    server = start(qpconn_server, "action", "deny")
    data = await in_thread(talk_first, server.address, b"EHLO bot.example\r\n")
    # One reply, the refusal instead of a greeting; the EHLO is never answered.
    assert data == (
        b"550 5.7.1 Connecting host started transmitting before SMTP greeting\r\n"
    )


@pytest_twisted.ensureDeferred
async def test_default_action_is_denysoft_as_in_qpsmtpd(qpconn_server):
    server = start(qpconn_server)
    data = await in_thread(talk_first, server.address, b"HELO bot\r\n")
    assert codes(data) == [b"450 4.7.1"]


@pytest_twisted.ensureDeferred
async def test_a_client_that_waits_is_greeted_after_the_wait(qpconn_server):
    server = start(qpconn_server, "action", "deny")

    def client() -> tuple[int, float, int]:
        started = time.monotonic()
        with Client(server.address) as smtp:
            waited = time.monotonic() - started
            return smtp.greeting.code, waited, smtp.code("EHLO client.test")

    greeting, waited, ehlo = await in_thread(client)
    assert (greeting, ehlo) == (220, 250)
    assert waited >= float(WAIT) - 0.05


@pytest_twisted.ensureDeferred
async def test_defer_reject_greets_and_refuses_at_mail(qpconn_server):
    server = start(qpconn_server, "action", "deny", "defer-reject", "1")
    data = await in_thread(
        talk_first,
        server.address,
        b"EHLO bot.example\r\n",
        b"MAIL FROM:<bot@example.org>\r\nRCPT TO:<u@mx.test>\r\nQUIT\r\n",
    )
    assert codes(data) == [b"220", b"250", b"550 5.7.1", b"503 5.5.1", b"221"]


@pytest_twisted.ensureDeferred
async def test_action_log_only_notes_and_the_early_commands_are_answered(qpconn_server):
    server = start(qpconn_server, "action", "log")
    seen: list[Any] = []

    class Spy(server.factory.commands):  # type: ignore[misc,name-defined]
        def greeting(self) -> str:
            seen.append(dict(self.connection.notes))
            return super().greeting()

    server.factory.commands = Spy
    data = await in_thread(talk_first, server.address, b"EHLO bot.example\r\nNOOP\r\n", b"", 3)
    assert codes(data) == [b"220", b"250", b"250"]
    assert seen == [{"early_talker": True}]


@pytest_twisted.ensureDeferred
async def test_relay_clients_are_neither_delayed_nor_refused(qpconn_server):
    # A 30 s hold: a relay client greeted in under half of it was not held at all.
    line = "earlytalker wait 30 action deny"
    server = qpconn_server(files={"relayclients": ["127.0.0.1"]},
                           plugins=["relay", line, "rcpt_ok", "queue/discard"])  # fmt: skip

    def client() -> tuple[bytes, float]:
        started = time.monotonic()
        data = talk_first(server.address, b"EHLO friend.example\r\n", b"", 2)
        return data, time.monotonic() - started

    data, waited = await in_thread(client)
    assert codes(data) == [b"220", b"250"]
    assert waited < 15


@pytest_twisted.ensureDeferred
async def test_an_early_flood_is_read_only_up_to_a_bound(qpconn_server):
    # The greeting is held 5 s: time for the flood to fill every buffer on the way while
    # the session is there to be looked at, however slow the machine.
    server = start(qpconn_server, "action", "deny", "wait", "5")
    sock = socket.create_connection(server.address, timeout=10)

    def flood() -> int:
        """Offer 8 MB; stop when nothing more is taken for half a second (the server has
        stopped reading and the kernel buffers are full) or when all 8 MB were taken."""
        sock.settimeout(0.5)
        sent = 0
        try:
            while sent < 8 << 20:
                sent += sock.send(b"x" * 65536)
        except TimeoutError:
            pass
        return sent

    try:
        sent = await in_thread(flood)
        # what the server read of it; it must have read past the bound to notice the talk
        # (a copy of the set: the reactor thread may change it while this one reads)
        assert await in_thread(wait_until, lambda: any(
            p.session.buffered > EARLY_TALK_BUFFER for p in tuple(server.factory.sessions)))
        buffered = max(p.session.buffered for p in server.factory.sessions)
        data = await in_thread(read_replies, sock, None)
    finally:
        sock.close()
    # Read up to the bound (the note needs a byte), then no further: far more was offered.
    assert sent > EARLY_TALK_BUFFER + 65536
    assert EARLY_TALK_BUFFER < buffered <= EARLY_TALK_BUFFER + 65536
    assert data.startswith(b"550 5.7.1 ")


class ProxyFactory(SMTPFactory):
    """Every connection must start with a PROXY header (from loopback)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, proxy=ProxySettings(enabled=True), **kwargs)


@pytest_twisted.ensureDeferred
async def test_bytes_that_come_with_the_proxy_header_are_early_talk(qpconn_server):
    server = start(qpconn_server, "action", "deny", factory_class=ProxyFactory)
    header = b"PROXY TCP4 192.0.2.9 127.0.0.1 40000 25\r\n"
    early = await in_thread(talk_first, server.address, header + b"EHLO bot\r\n")
    polite = await in_thread(talk_first, server.address, header, b"EHLO client\r\n", 2)
    assert codes(early) == [b"550 5.7.1"]
    assert codes(polite) == [b"220", b"250"]


@pytest.mark.parametrize(
    "args",
    [
        ("wait",),
        ("wait", "soon"),
        ("wait", "-1"),
        ("wait", "120"),
        ("action", "reject"),
        ("defer-reject", "yes"),
        ("check-at", "DATA"),
    ],
)
def test_bad_arguments_stop_the_server_at_start(tmp_path, args):
    with pytest.raises(PluginLoadError):
        load_plugin(Config(None), "earlytalker", *args)


def test_arguments_are_read_as_qpsmtpd_names_them():
    plugin = load_plugin(Config(None), "earlytalker", "wait", "2.5", "action", "DENY",
                         "defer-reject", "1")  # fmt: skip
    assert (plugin.wait, plugin.action, plugin.defer_reject) == (2.5, "deny", True)
    assert plugin.timeout is not None and plugin.timeout > plugin.wait
    default = load_plugin(Config(None), "earlytalker")
    assert (default.wait, default.action, default.defer_reject) == (1.0, "denysoft", False)
