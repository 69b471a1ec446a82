"""queue/discard: accept every message and keep nothing.

For benchmarks and tests only: the client gets a 250, as from a real queue, but the
message is dropped. Never use it where mail matters.
"""

from __future__ import annotations

from typing import Any

from qpconn.hooks.results import OK, Result
from qpconn.plugins import Plugin


class Discard(Plugin):
    """Says OK at ``queue`` without storing anything."""

    def hook_queue(self, transaction: Any) -> tuple[Result, str]:
        return OK, f"2.0.0 Queued as {transaction.id} (discarded)"
