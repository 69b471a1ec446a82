"""The shared half of badmailfrom and badrcptto: refuse an address found in a list.

Both read a ``badmailfrom``-style list (:class:`qpconn.kit.policy.AddressList`), take the same
``reject``/``reject_type`` arguments and record the same verdicts; they differ only in the
list they read, the hook (``MAIL`` or ``RCPT``) and the default reason. Keeping the check
here means a fix to one (say, how a match is noted) cannot miss the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from qpconn.hooks.plugin import Plugin
from qpconn.hooks.verdicts import RejectPolicy, record
from qpconn.kit.policy import AddressList, parse_options
from qpconn.mail.address import Address

_DEFAULTS = {"reject": "1", "reject_type": "perm"}
_CHOICES = {"reject": ("0", "1", "naughty"), "reject_type": ("perm", "temp", "disconnect")}


class ListedAddressCheck(Plugin):
    """Base class: subclasses call :meth:`read_list` in ``register`` and :meth:`judge` in
    their hook."""

    #: the hook's stage in verdicts (``"mail"``, ``"rcpt"``)
    stage = ""
    #: what the client is told when the list line gives no reason
    default_reason = ""

    def read_list(self, args: Sequence[str], setting: str, lines: Iterable[str]) -> None:
        """Parse the plugin arguments and the ``setting`` list's ``lines``."""
        self.policy = RejectPolicy.from_options(parse_options(self.name, args, _DEFAULTS, _CHOICES))
        self.entries = AddressList(setting, lines)

    def judge(self, transaction: Any, address: Address, label: str = "") -> Any:
        """Pass ``address`` (noting it) or refuse it under the reject policy.

        ``label`` starts the verdict's reason (e.g. the recipient, where a transaction
        has several).
        """
        found = self.entries.match(address)
        if found is None:
            record(transaction, self.name, "pass", f"{label}not listed", stage=self.stage)
            return None
        entry, reason = found
        return self.policy.fail(
            transaction,
            self.name,
            self.stage,
            f"5.7.1 {reason or self.default_reason}",
            reason=f"{label}matches {entry}",
            scope="transaction",
        )
