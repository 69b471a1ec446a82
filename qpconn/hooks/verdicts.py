"""Verdicts: how policy plugins record what they found, and turn it into a hook result.

Every check plugin (``dnsbl``, ``helo``, ``headers`` ...) ends with a *verdict*: what it
found (``pass``, ``fail``, ``temperror``, ``skip``), why, and what it did about it. The
verdict is appended to ``connection.notes["verdicts"]`` as a plain dict, so later plugins
(``karma``, a logger, a header writer) and the logs can see every judgment of the session
without knowing which plugin made it.

What a plugin does with a failure follows qpsmtpd's shared arguments:

* ``reject 1`` (default) refuses at once, ``reject 0`` only records, and
  ``reject naughty`` marks the session *naughty* (``notes["naughty"]``) so that the
  ``naughty`` plugin refuses it at one chosen stage;
* ``reject_type perm|temp|disconnect|temp_disconnect`` picks the kind of refusal;
* ``dns_error tempfail|ignore``: a DNS failure gives a temporary refusal (the default:
  a check that could not run must not let mail through unseen), or is let pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qpconn.hooks.results import DENY, DENY_DISCONNECT, DENYSOFT, DENYSOFT_DISCONNECT, Result

__all__ = [
    "NAUGHTY",
    "RejectPolicy",
    "record",
    "verdicts",
    "mark_naughty",
    "naughty_mark",
    "with_class",
    "POLICY_DEFAULTS",
]

#: the note (on the connection or the transaction) holding ``{"plugin", "reason", ...}``
NAUGHTY = "naughty"
VERDICTS = "verdicts"

_REJECT_TYPES: dict[str, Result] = {
    "perm": DENY,
    "temp": DENYSOFT,
    "soft": DENYSOFT,
    "disconnect": DENY_DISCONNECT,
    "temp_disconnect": DENYSOFT_DISCONNECT,
}
_TEMPORARY = {DENYSOFT: DENYSOFT, DENY: DENYSOFT, DENY_DISCONNECT: DENYSOFT_DISCONNECT}
_ENHANCED = re.compile(r"^[245](\.\d{1,3}\.\d{1,3})(?=\s|$)")

#: the shared arguments and their defaults, for :func:`qpconn.kit.policy.parse_options`
POLICY_DEFAULTS: dict[str, str] = {"reject": "1", "reject_type": "perm", "dns_error": "tempfail"}
POLICY_CHOICES: dict[str, tuple[str, ...]] = {
    "reject": ("0", "1", "naughty"),
    "reject_type": tuple(_REJECT_TYPES),
    "dns_error": ("tempfail", "ignore"),
}


def record(transaction: Any, plugin: str, result: str, reason: str, **extra: Any) -> dict[str, Any]:
    """Append one verdict to ``connection.notes["verdicts"]`` and return it."""
    entry: dict[str, Any] = {"plugin": plugin, "result": result, "reason": reason, **extra}
    transaction.connection.notes.setdefault(VERDICTS, []).append(entry)
    return entry


def verdicts(connection: Any, plugin: str | None = None) -> list[dict[str, Any]]:
    """The verdicts recorded so far on ``connection``, optionally of one plugin only."""
    found = connection.notes.get(VERDICTS) or []
    return [entry for entry in found if plugin is None or entry["plugin"] == plugin]


def with_class(message: str, digit: str) -> str:
    """``message`` with its leading enhanced status code moved to class ``digit``.

    A reply's enhanced code must agree with its reply code (RFC 3463), so a permanent
    reason given as a temporary refusal becomes ``4.x.y``; a message without a code
    gets ``<digit>.7.1`` (a policy refusal).
    """
    match = _ENHANCED.match(message)
    if match:
        return digit + message[1:]
    return f"{digit}.7.1 {message}"


def mark_naughty(
    target: Any,
    plugin: str,
    message: str,
    *,
    temporary: bool = False,
    disconnect: bool = False,
    stage: str = "",
) -> None:
    """Mark a connection or transaction naughty, unless an earlier plugin already did.

    ``target`` is the Connection (the client itself is bad: its address, its name) or the
    Transaction (this message is bad: sender, header); the ``naughty`` plugin reads both.
    The first mark wins, so the client is told the first reason found.
    """
    target.notes.setdefault(
        NAUGHTY,
        {
            "plugin": plugin,
            "message": message,
            "temporary": temporary,
            "disconnect": disconnect,
            "stage": stage,
        },
    )


def naughty_mark(transaction: Any) -> dict[str, Any] | None:
    """The naughty mark that applies now: this transaction's, else the connection's."""
    mark = transaction.notes.get(NAUGHTY) if transaction is not None else None
    return mark or transaction.connection.notes.get(NAUGHTY)


@dataclass(frozen=True)
class RejectPolicy:
    """The ``reject``/``reject_type``/``dns_error`` arguments of one plugin."""

    reject: str = "1"
    reject_type: str = "perm"
    dns_error: str = "tempfail"

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> RejectPolicy:
        return cls(
            reject=options.get("reject", "1"),
            reject_type=options.get("reject_type", "perm"),
            dns_error=options.get("dns_error", "tempfail"),
        )

    def result_kind(self, temporary: bool) -> Result:
        kind = _REJECT_TYPES[self.reject_type]
        return _TEMPORARY.get(kind, kind) if temporary else kind

    def fail(
        self,
        transaction: Any,
        plugin: str,
        stage: str,
        message: str,
        *,
        reason: str | None = None,
        temporary: bool = False,
        scope: str = "connection",
        **extra: Any,
    ) -> tuple[Result, str] | None:
        """Record a failed check and return what the hook should return.

        ``message`` is what the client is told, with its enhanced code (``"5.7.1 ..."``);
        ``temporary`` says the check could not be made (DNS failure), which gives a
        4xx refusal, or nothing at all under ``dns_error ignore``. ``scope`` is where a
        naughty mark goes: ``"connection"`` or ``"transaction"``.
        """
        result = "temperror" if temporary else "fail"
        why = reason or message
        if temporary and self.dns_error == "ignore":
            record(transaction, plugin, result, why, stage=stage, action="accept", **extra)
            return None
        if self.reject == "0":
            record(transaction, plugin, result, why, stage=stage, action="log", **extra)
            return None
        kind = self.result_kind(temporary)
        text = with_class(message, "4" if kind in (DENYSOFT, DENYSOFT_DISCONNECT) else "5")
        if self.reject == "naughty":
            target = transaction if scope == "transaction" else transaction.connection
            mark_naughty(
                target,
                plugin,
                text,
                temporary=kind in (DENYSOFT, DENYSOFT_DISCONNECT),
                disconnect=kind.disconnects,
                stage=stage,
            )
            record(transaction, plugin, result, why, stage=stage, action="naughty", **extra)
            return None
        action = "tempfail" if text.startswith("4") else "reject"
        record(transaction, plugin, result, why, stage=stage, action=action, **extra)
        return kind, text
