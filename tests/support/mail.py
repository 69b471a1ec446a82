"""Small helpers for the plugin tests: delivered messages and the verdicts plugins note."""

from __future__ import annotations

from typing import Any

from qpconn.plugins import Plugin
from tests.e2e_client import split_message


def header_fields(message: bytes) -> list[bytes]:
    """The fields as the server wrote them (without the Maildir's Return-Path/Delivered-To)."""
    fields, _ = split_message(message)
    return [f for f in fields if not f.startswith((b"Return-Path:", b"Delivered-To:"))]


def auth_results(message: bytes) -> bytes:
    """Our one Authentication-Results field (``mx.test``), unfolded."""
    (field,) = [f for f in header_fields(message) if f.startswith(b"Authentication-Results: mx")]
    return field


class Watch(Plugin):
    """Keeps a copy of the connection's verdict notes at every hook it sees.

    List it after the plugins under test: ``seen[hook]`` is the list of verdicts so far
    each time ``hook`` ran.
    """

    def register(self) -> None:
        self.seen: dict[str, list[list[dict[str, str]]]] = {}

    def _keep(self, hook: str, transaction: Any) -> None:
        verdicts = transaction.connection.notes.get("verdicts", [])
        self.seen.setdefault(hook, []).append(list(verdicts))

    def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> None:
        self._keep("rcpt", transaction)

    def hook_data_post(self, transaction: Any) -> None:
        self._keep("data_post", transaction)

    def last(self, hook: str) -> dict[str, str]:
        """The latest verdict noted when ``hook`` last ran."""
        return self.seen[hook][-1][-1]
