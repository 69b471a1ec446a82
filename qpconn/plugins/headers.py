"""headers: refuse messages whose header breaks RFC 5322 in ways spam software does.

Checked at ``data_post`` (the whole header is there), in this order:

* every field of ``required`` is present (default ``From,Date``: RFC 5322 §3.6 makes
  them the only mandatory fields);
* no field that RFC 5322 §3.6 allows once (``From``, ``Date``, ``Subject``,
  ``Message-ID`` ...) appears twice;
* ``Date`` parses, and is at most ``future`` days ahead of our clock (default 2) and
  ``past`` days behind it (default 15); ``0`` turns that check off.

A refusal is ``552 5.6.0`` (at ``data_post`` a DENY is 552). Relay clients and
authenticated users are not
checked: their messages are still being composed (RFC 6409 lets a submission server
add a missing ``Date``).

Arguments: ``required From,Date``, ``future N``, ``past N``, ``reject 1|0|naughty``,
``reject_type perm|temp|disconnect``.
"""

from __future__ import annotations

import datetime
import email.utils
from typing import Any

from qpconn.hooks.verdicts import RejectPolicy, record
from qpconn.kit.policy import parse_options
from qpconn.plugins import Plugin

#: fields RFC 5322 §3.6 allows at most once
SINGULAR = (
    "Date",
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Bcc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Subject",
)
_DEFAULTS = {"required": "From,Date", "future": "2", "past": "15", "reject": "1",
             "reject_type": "perm"}  # fmt: skip
_CHOICES = {"reject": ("0", "1", "naughty"), "reject_type": ("perm", "temp", "disconnect")}
DAY = 86400.0


class Headers(Plugin):
    """Checks required, singular and ``Date`` fields of each message."""

    def register(self, *args: str) -> None:
        options = parse_options(self.name, args, _DEFAULTS, _CHOICES, numbers=["future", "past"])
        self.policy = RejectPolicy.from_options(options)
        self.required = [name.strip() for name in options["required"].split(",") if name.strip()]
        self.future = float(options["future"]) * DAY
        self.past = float(options["past"]) * DAY
        if self.future < 0 or self.past < 0:
            raise ValueError("future and past must not be negative")

    def hook_data_post(self, transaction: Any) -> Any:
        if transaction.connection.relay_client or transaction.connection.auth_user:
            record(transaction, self.name, "skip", "relay client or authenticated user",
                   stage="data_post")  # fmt: skip
            return None
        problem = self._problem(transaction.header)
        if problem is None:
            record(transaction, self.name, "pass", "header ok", stage="data_post")
            return None
        return self.policy.fail(
            transaction, self.name, "data_post", f"5.6.0 {problem}", scope="transaction"
        )

    def _problem(self, header: Any) -> str | None:
        for name in self.required:
            if header.count(name) == 0:
                return f"Message has no {name} header"
        for name in SINGULAR:
            if header.count(name) > 1:
                return f"Message has more than one {name} header"
        value = header.get("Date")
        if value is None or not (self.future or self.past):
            return None
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:  # "-0000": the zone is unknown; UTC is the best guess
                when = when.replace(tzinfo=datetime.UTC)
            stamp = when.timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return "The Date header is not a valid RFC 5322 date"
        now = self.server.clock.seconds() if self.server is not None else None
        if now is None:
            return None
        if self.future and stamp > now + self.future:
            return "The Date header is too far in the future"
        if self.past and stamp < now - self.past:
            return "The Date header is too far in the past"
        return None
