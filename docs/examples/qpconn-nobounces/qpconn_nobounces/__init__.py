"""nobounces [RECIPIENT ...]: refuse bounces (the null sender ``MAIL FROM:<>``).

An example of a qpconn plugin shipped as its own Python package: its ``pyproject.toml``
declares the entry point ``nobounces`` in the group ``qpconn.plugins``, so once the
package is installed next to qpconn, ``nobounces`` in ``config/plugins`` loads this class.

A bounce to one of the RECIPIENTs (e.g. ``postmaster@example.com``) is let through: RFC
5321 section 4.5.1 wants postmaster to accept mail, bounces included. The sender is only
known to be null at MAIL, the recipients at RCPT, so the refusal is given at RCPT.
"""

from __future__ import annotations

from qpconn import DECLINED, DENY, Address, Plugin, Transaction
from qpconn.hooks.types import HookResult, Params

__all__ = ["NoBounces"]


class NoBounces(Plugin):
    """Refuse ``MAIL FROM:<>`` at RCPT unless the recipient is one of the arguments."""

    def register(self, *recipients: str) -> None:
        bad = [r for r in recipients if "@" not in r]
        if bad:  # a ValueError here stops the server at start-up, quoting the line
            raise ValueError(f"not an address: {bad[0]}")
        self.allowed = {r.lower() for r in recipients}

    def hook_rcpt(self, transaction: Transaction, recipient: Address, params: Params) -> HookResult:
        if transaction.sender is None or not transaction.sender.is_null:
            return DECLINED
        if recipient.address.lower() in self.allowed:
            return DECLINED
        self.log.info("bounce to {rcpt} refused", rcpt=recipient.address)
        return DENY, "5.7.1 we do not accept bounces for this address"
