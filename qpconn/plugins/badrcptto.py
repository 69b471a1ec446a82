"""badrcptto: refuse recipients listed in ``badrcptto``.

For addresses that must never receive mail from outside (internal lists, spam traps,
retired accounts). Lines as in ``badmailfrom``: ``user@host``, ``@host`` or ``/regex/``,
optionally followed by the reason. The refusal is ``550 5.7.1 Mail to this recipient is
not accepted here``; list the plugin before ``rcpt_ok``, which accepts every local
recipient. Relay clients are refused too: the list is about the recipient.

Arguments: ``reject 1|0|naughty``, ``reject_type perm|temp|disconnect``.
"""

from __future__ import annotations

from typing import Any

from qpconn.address import Address
from qpconn.checks import AddressList, parse_options
from qpconn.plugins import Plugin
from qpconn.verdicts import RejectPolicy, record

DEFAULT_REASON = "Mail to this recipient is not accepted here"
_DEFAULTS = {"reject": "1", "reject_type": "perm"}
_CHOICES = {"reject": ("0", "1", "naughty"), "reject_type": ("perm", "temp", "disconnect")}


class Badrcptto(Plugin):
    """Compares each recipient with the ``badrcptto`` entries at ``RCPT``."""

    def register(self, *args: str) -> None:
        self.policy = RejectPolicy.from_options(parse_options(self.name, args, _DEFAULTS, _CHOICES))
        self.entries = AddressList("badrcptto", self.config.lines("badrcptto"))

    def hook_rcpt(self, transaction: Any, recipient: Address, params: Any) -> Any:
        found = self.entries.match(recipient)
        if found is None:
            record(transaction, self.name, "pass", f"{recipient.address} not listed", stage="rcpt")
            return None
        entry, reason = found
        return self.policy.fail(
            transaction,
            self.name,
            "rcpt",
            f"5.7.1 {reason or DEFAULT_REASON}",
            reason=f"{recipient.address} matches {entry}",
            scope="transaction",
        )
