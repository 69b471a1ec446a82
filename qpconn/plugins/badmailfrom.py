"""badmailfrom: refuse senders listed in ``badmailfrom``.

Each line of ``badmailfrom`` is ``user@host`` (that address, any case), ``@host`` (every
sender of that domain) or ``/regex/`` (searched in ``user@host``, ignoring case; the form
for qpsmtpd's ``badmailfrom_re`` patterns), optionally followed by the reason the client
is told. The default reason is qpsmtpd's: ``550 5.7.1 Your envelope sender is in my
badmailfrom list``. The null sender is never listed.

Arguments: ``reject 1|0|naughty``, ``reject_type perm|temp|disconnect``.
"""

from __future__ import annotations

from typing import Any

from qpconn.address import Address
from qpconn.checks import AddressList, parse_options
from qpconn.plugins import Plugin
from qpconn.verdicts import RejectPolicy, record

DEFAULT_REASON = "Your envelope sender is in my badmailfrom list"
_DEFAULTS = {"reject": "1", "reject_type": "perm"}
_CHOICES = {"reject": ("0", "1", "naughty"), "reject_type": ("perm", "temp", "disconnect")}


class Badmailfrom(Plugin):
    """Compares the envelope sender with the ``badmailfrom`` entries at ``MAIL``."""

    def register(self, *args: str) -> None:
        self.policy = RejectPolicy.from_options(parse_options(self.name, args, _DEFAULTS, _CHOICES))
        self.entries = AddressList("badmailfrom", self.config.lines("badmailfrom"))

    def hook_mail(self, transaction: Any, sender: Address, params: Any) -> Any:
        found = self.entries.match(sender)
        if found is None:
            record(transaction, self.name, "pass", "not listed", stage="mail")
            return None
        entry, reason = found
        return self.policy.fail(
            transaction,
            self.name,
            "mail",
            f"5.7.1 {reason or DEFAULT_REASON}",
            reason=f"matches {entry}",
            scope="transaction",
        )
