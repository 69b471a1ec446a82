"""loop: refuse a message that has passed through too many servers (a mail loop).

Counts the ``Received`` and ``Delivered-To`` fields (as qpsmtpd does; ours is already
on top at ``data_post``) and refuses the message when there are more than N, default
100 (RFC 5321 §6.3 asks for a limit of at least 100), with
``554 5.4.6 Too many hops`` (RFC 3463: routing loop detected). The reply is given as a
whole (``DONE``), because the ``data_post`` table would make a DENY a 552, which means
"storage exceeded" and is wrong for a loop.

Argument: ``N`` (qpsmtpd's form, ``loop 100``) or ``max_hops N``.
"""

from __future__ import annotations

from typing import Any

from qpconn.hooks.results import DONE
from qpconn.hooks.verdicts import record
from qpconn.plugins import Plugin

DEFAULT_MAX_HOPS = 100


class Loop(Plugin):
    """Counts trace fields at ``data_post``."""

    def register(self, *args: str) -> None:
        words = list(args)
        if words[:1] == ["max_hops"]:
            words = words[1:]
        if len(words) > 1 or (words and not words[0].isdigit()):
            raise ValueError(f"loop takes one whole number (max hops), not {args!r}")
        self.max_hops = int(words[0]) if words else DEFAULT_MAX_HOPS
        if self.max_hops < 1:
            raise ValueError("max hops must be at least 1")

    def hook_data_post(self, transaction: Any) -> Any:
        header = transaction.header
        hops = header.count("Received") + header.count("Delivered-To")
        if hops > self.max_hops:
            record(
                transaction,
                self.name,
                "fail",
                f"{hops} hops, limit {self.max_hops}",
                stage="data_post",
                action="reject",
            )
            return DONE, f"554 5.4.6 Too many hops ({hops}); this looks like a mail loop"
        record(transaction, self.name, "pass", f"{hops} hops", stage="data_post")
        return None
