"""count_unrecognized_commands N: disconnect a client after N unknown commands (default 4).

Clients that send garbage are rarely mail clients; after N tries they get 521 and the
connection is closed, as qpsmtpd's plugin of the same name does.
"""

from __future__ import annotations

from typing import Any

from qpconn.hooks.results import DECLINED, DENY_DISCONNECT, Result
from qpconn.plugins import Plugin

_NOTE = "unrec_cmd_count"


class CountUnrecognizedCommands(Plugin):
    """Counts unknown commands per connection in ``connection.notes``."""

    def register(self, limit: str = "4") -> None:
        if not limit.isdigit() or int(limit) < 1:
            raise ValueError(f"limit must be a positive whole number, not {limit!r}")
        self.limit = int(limit)

    def hook_unrecognized_command(
        self, transaction: Any, verb: str, arg: str
    ) -> Result | tuple[Result, str]:
        notes = transaction.connection.notes
        count = notes.get(_NOTE, 0) + 1
        notes[_NOTE] = count
        if count >= self.limit:
            return DENY_DISCONNECT, f"5.5.1 Closing connection: {count} unrecognized commands"
        return DECLINED
