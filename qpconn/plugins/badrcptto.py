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

from qpconn.kit.listcheck import ListedAddressCheck
from qpconn.mail.address import Address

DEFAULT_REASON = "Mail to this recipient is not accepted here"


class Badrcptto(ListedAddressCheck):
    """Compares each recipient with the ``badrcptto`` entries at ``RCPT``."""

    stage = "rcpt"
    default_reason = DEFAULT_REASON

    def register(self, *args: str) -> None:
        self.read_list(args, "badrcptto", self.config.lines("badrcptto"))

    def hook_rcpt(self, transaction: Any, recipient: Address, params: Any) -> Any:
        return self.judge(transaction, recipient, f"{recipient.address} ")
