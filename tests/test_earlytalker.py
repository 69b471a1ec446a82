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
from twisted.internet import reactor, task

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from qpconn.server.factory import SMTPFactory
from qpconn.server.guard import EARLY_TALK_BUFFER
from qpconn.server.proxy import ProxySettings
from tests.e2e_client import Client, watch_errors
from tests.support.server import in_thread, read_until_quiet

WAIT = "0.3"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


def start(qpconn_server: Any, *args: str, files: dict[str, Any] | None = None, **kw: Any) -> Any:
    line = " ".join(("earlytalker", "wait", WAIT, *args))
    return qpconn_server(
        files=files, plugins=["relay", line, "rcpt_ok", "queue/discard"], **kw
    )


def talk_first(address: tuple[str, int], early: bytes, later: bytes = b"") -> bytes:
    """Send ``early`` right after connecting, then ``later`` once something came back."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(early)
        data = read_until_quiet(sock, wait=0.5)
        if later:
            sock.sendall(later)
            data += read_until_quiet(sock, wait=0.5)
        return data


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
    data = await in_thread(talk_first, server.address, b"EHLO bot.example\r\nNOOP\r\n")
    assert codes(data) == [b"220", b"250", b"250"]
    assert seen == [{"early_talker": True}]


@pytest_twisted.ensureDeferred
async def test_relay_clients_are_neither_delayed_nor_refused(qpconn_server):
    server = start(qpconn_server, "action", "deny", files={"relayclients": ["127.0.0.1"]})

    def client() -> bytes:
        started = time.monotonic()
        data = talk_first(server.address, b"EHLO friend.example\r\n")
        assert time.monotonic() - started < float(WAIT) + 0.5
        return data

    assert codes(await in_thread(client)) == [b"220", b"250"]


@pytest_twisted.ensureDeferred
async def test_an_early_flood_is_read_only_up_to_a_bound(qpconn_server):
    server = start(qpconn_server, "action", "deny", "wait", "0.6")
    buffered: list[int] = []

    def measure() -> None:
        buffered.extend(p.session.buffered for p in server.factory.sessions)

    def client() -> bytes:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.setblocking(False)
            sent = 0
            deadline = time.monotonic() + 0.4
            while time.monotonic() < deadline and sent < 8 << 20:
                try:
                    sent += sock.send(b"x" * 65536)
                except BlockingIOError:
                    time.sleep(0.01)
            sock.setblocking(True)
            return read_until_quiet(sock, wait=0.5)

    flood = in_thread(client)
    await task.deferLater(reactor, 0.5, measure)
    data = await flood
    # Read up to the bound (the note needs a byte), then no further: 8 MB were offered.
    assert buffered and EARLY_TALK_BUFFER < max(buffered) <= EARLY_TALK_BUFFER + 65536
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
    polite = await in_thread(talk_first, server.address, header, b"EHLO client\r\n")
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
