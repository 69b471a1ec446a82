"""Helpers for the policy plugin tests: scripted sessions from a chosen loopback address.

Each test starts a real qpconn (``qpconn_server``) whose DNS goes only to the test's own
loopback DNS server, then talks to it from a 127.0.0.x source address with a blocking
client run in a thread. :func:`script` sends commands one by one and stops at the first
reply that closes the session, so a test states the whole conversation it expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qpconn.config import Config
from qpconn.plugins import Plugin
from qpconn.server.peerinfo import LookupSettings
from tests.e2e_client import Client, ConnectionClosed, Reply
from tests.support.dnsserver import DNSTestServer
from tests.test_e2e_lookups import BoundClient

__all__ = ["lookups", "script", "codes", "send_message", "Client", "Reply", "BoundClient"]

DNS_TIMEOUT = 0.5


def lookups(dns: DNSTestServer, *, rdns: bool = False) -> LookupSettings:
    """Lookups that ask only ``dns``, with a short DNS timeout."""
    return LookupSettings(rdns=rdns, dns_servers=[dns.address], dns_timeout=DNS_TIMEOUT)


def script(
    address: tuple[str, int], source: str, commands: Sequence[str | bytes], *, end: bool = True
) -> list[Reply]:
    """The greeting and the reply to each command; stops at the first closed connection.

    A ``bytes`` item is sent as message text (followed by the end-of-data marker), when
    the reply before it was 354; otherwise the script ends there.
    """
    replies: list[Reply] = []
    with BoundClient(address, source) as client:
        replies.append(client.greeting)
        if client.greeting.code >= 400:
            return replies
        for command in commands:
            if isinstance(command, bytes) and replies[-1].code != 354:
                break  # DATA was refused: there is no message to send
            try:
                if isinstance(command, bytes):
                    replies.append(client.message(command))
                else:
                    replies.append(client.cmd(command))
            except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
                break
            if replies[-1].code == 421:
                break
        if end:
            try:
                client.cmd("QUIT")
            except (ConnectionClosed, ConnectionResetError, BrokenPipeError, OSError):
                pass
    return replies


def codes(replies: Sequence[Reply]) -> list[int]:
    """The reply codes, for compact assertions."""
    return [reply.code for reply in replies]


def send_message(
    address: tuple[str, int],
    source: str,
    sender: str,
    recipient: str,
    text: bytes,
    helo: str = "client.test",
) -> list[Reply]:
    """EHLO, MAIL, RCPT, DATA and ``text`` from ``source``; every reply (greeting first)."""
    return script(
        address,
        source,
        [f"EHLO {helo}", f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>", "DATA", text],
    )


def verdicts_of(watch: Any, hook: str, plugin: str) -> list[dict[str, Any]]:
    """The verdicts ``plugin`` had noted when ``hook`` last ran (see tests.support.mail.Watch)."""
    return [v for v in watch.seen[hook][-1] if v["plugin"] == plugin]


class Sessions(Plugin):
    """Keeps every finished session's verdict notes (list it anywhere: it only reads).

    ``sessions[-1]`` is the list of verdicts of the last session that disconnected; await
    ``server.wait_sessions_closed()`` first.
    """

    def register(self) -> None:
        self.sessions: list[list[dict[str, Any]]] = []

    def hook_disconnect(self, transaction: Any) -> None:
        self.sessions.append(list(transaction.connection.notes.get("verdicts", [])))

    def of(self, plugin: str, index: int = -1) -> list[dict[str, Any]]:
        """The verdicts ``plugin`` recorded in session ``index`` (default: the last)."""
        return [v for v in self.sessions[index] if v["plugin"] == plugin]


def sessions_plugin() -> Sessions:
    return Sessions(Config(None), "sessions")
