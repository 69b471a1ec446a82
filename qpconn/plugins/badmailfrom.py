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

from qpconn.kit.listcheck import ListedAddressCheck
from qpconn.mail.address import Address

DEFAULT_REASON = "Your envelope sender is in my badmailfrom list"


class Badmailfrom(ListedAddressCheck):
    """Compares the envelope sender with the ``badmailfrom`` entries at ``MAIL``."""

    stage = "mail"
    default_reason = DEFAULT_REASON

    def register(self, *args: str) -> None:
        self.read_list(args, "badmailfrom", self.config.lines("badmailfrom"))

    def hook_mail(self, transaction: Any, sender: Address, params: Any) -> Any:
        return self.judge(transaction, sender)
