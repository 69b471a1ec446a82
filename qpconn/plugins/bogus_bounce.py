"""bogus_bounce: refuse null-sender messages that cannot be real bounces (qpsmtpd's checks).

A delivery status notification (RFC 3464) is sent with the null sender ``<>`` to the
one address that sent the original message. Spam sent "as a bounce" to get past
sender checks gives itself away by:

* having more than one recipient: a bounce goes to exactly one original sender;
* carrying a ``Return-Path`` that is not ``<>``: the bouncing server writes the empty
  path it used, never another.

Checked at ``data_post``. Argument: ``log`` (only record), ``deny`` (default:
``552 5.7.1``), ``denysoft`` (``452 4.7.1``) or ``naughty`` (leave it to ``naughty``).
Messages with a sender are not looked at.
"""

from __future__ import annotations

from typing import Any

from qpconn.hooks.verdicts import RejectPolicy, record
from qpconn.plugins import Plugin

_POLICIES = {
    "log": RejectPolicy(reject="0"),
    "deny": RejectPolicy(),
    "denysoft": RejectPolicy(reject_type="temp"),
    "naughty": RejectPolicy(reject="naughty"),
}


class BogusBounce(Plugin):
    """Checks the envelope and ``Return-Path`` of null-sender messages at ``data_post``."""

    def register(self, action: str = "deny") -> None:
        if action not in _POLICIES:
            raise ValueError(f"action must be one of {'|'.join(_POLICIES)}, not {action!r}")
        self.policy = _POLICIES[action]

    def hook_data_post(self, transaction: Any) -> Any:
        sender = transaction.sender
        if sender is None or not sender.is_null:
            return None
        problem = None
        if len(transaction.recipients) > 1:
            problem = "a bounce has exactly one recipient"
        else:
            paths = [value.strip() for value in transaction.header.get_all("Return-Path")]
            if any(path not in ("<>", "") for path in paths):
                problem = "a bounce has an empty Return-Path"
        if problem is None:
            record(transaction, self.name, "pass", "plausible bounce", stage="data_post")
            return None
        return self.policy.fail(
            transaction,
            self.name,
            "data_post",
            f"5.7.1 This is not a valid bounce: {problem}",
            scope="transaction",
        )
