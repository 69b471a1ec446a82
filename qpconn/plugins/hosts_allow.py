"""hosts_allow: per-network allow/deny rules (``hosts_allow``) and a per-address connection cap.

Each line of ``hosts_allow`` is ``ADDRESS-OR-NETWORK ACTION [message]``; the first line
whose network contains the client decides:

* ``allow`` (or qpsmtpd's ``OK``/``DECLINED``): let the client in, and exempt it from
  the connection cap;
* ``deny`` (``DENY``, ``DENY_DISCONNECT``): ``550 5.7.1`` and close;
* ``denysoft`` (``DENYSOFT``, ``DENYSOFT_DISCONNECT``): ``450 4.7.1`` and close.

The message replaces the default text (an enhanced code at its start is kept).

``max_conn_per_ip N`` (qpsmtpd's ``--max-from-ip``) refuses a client that already has N
sessions open with ``450 4.7.0 Too many connections from <ip>``. Sessions are counted
in the server's list of open sessions, so the count is per server (per worker process).
Both run at ``pre-connection``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qpconn.hooks.results import DENY_DISCONNECT, DENYSOFT_DISCONNECT, Result
from qpconn.hooks.verdicts import record, with_class
from qpconn.kit.policy import parse_ip, parse_network, parse_options
from qpconn.plugins import Plugin

_ACTIONS: dict[str, Result | None] = {
    "allow": None,
    "ok": None,
    "declined": None,
    "deny": DENY_DISCONNECT,
    "deny_disconnect": DENY_DISCONNECT,
    "denysoft": DENYSOFT_DISCONNECT,
    "denysoft_disconnect": DENYSOFT_DISCONNECT,
}


@dataclass(frozen=True)
class Rule:
    network: Any
    action: str
    result: Result | None
    message: str | None


def parse_rules(lines: list[str]) -> list[Rule]:
    """``hosts_allow`` lines as rules; a bad network or action raises ValueError."""
    rules = []
    for line in lines:
        parts = line.split(None, 2)
        if len(parts) < 2 or parts[1].lower() not in _ACTIONS:
            raise ValueError(f"hosts_allow: {line!r} is not 'NETWORK allow|deny|denysoft [text]'")
        action = parts[1].lower()
        message = parts[2].strip() if len(parts) > 2 else None
        rules.append(
            Rule(parse_network("hosts_allow", parts[0]), action, _ACTIONS[action], message)
        )
    return rules


class HostsAllow(Plugin):
    """Applies ``hosts_allow`` and ``max_conn_per_ip`` before the greeting."""

    def register(self, *args: str) -> None:
        options = parse_options(
            self.name, args, {"max_conn_per_ip": "0"}, numbers=["max_conn_per_ip"]
        )
        self.max_conn = int(float(options["max_conn_per_ip"]))
        if self.max_conn < 0:
            raise ValueError("max_conn_per_ip must not be negative")
        self.rules = parse_rules(self.config.lines("hosts_allow"))

    def hook_pre_connection(self, transaction: Any) -> Any:
        ip_text = transaction.connection.remote_ip
        ip = parse_ip(ip_text) if ip_text else None
        if ip is None:
            record(transaction, self.name, "skip", "no IP address", stage="pre-connection")
            return None
        for rule in self.rules:
            if ip.version == rule.network.version and ip in rule.network:
                return self._apply(transaction, rule)
        return self._cap(transaction, ip_text)

    def _apply(self, transaction: Any, rule: Rule) -> Any:
        reason = f"{rule.network} {rule.action}"
        if rule.result is None:
            record(transaction, self.name, "pass", reason, stage="pre-connection")
            return None
        temporary = rule.result is DENYSOFT_DISCONNECT
        default = (
            "4.7.1 Connection temporarily refused"
            if temporary
            else ("5.7.1 Connections from your address are not accepted")
        )
        message = with_class(rule.message, "4" if temporary else "5") if rule.message else default
        action = "tempfail" if temporary else "reject"
        record(transaction, self.name, "fail", reason, stage="pre-connection", action=action)
        return rule.result, message

    def _cap(self, transaction: Any, ip: str) -> Any:
        if not self.max_conn:
            record(transaction, self.name, "pass", "no rule matches", stage="pre-connection")
            return None
        sessions = getattr(self.server, "sessions", ()) if self.server is not None else ()
        count = sum(
            1 for session in sessions if getattr(session.connection, "remote_ip", None) == ip
        )
        if count > self.max_conn:
            record(
                transaction,
                self.name,
                "fail",
                f"{count} sessions open, limit {self.max_conn}",
                stage="pre-connection",
                action="tempfail",
            )
            return DENYSOFT_DISCONNECT, f"4.7.0 Too many connections from {ip}; try again later"
        record(
            transaction,
            self.name,
            "pass",
            f"{count} of {self.max_conn} sessions",
            stage="pre-connection",
        )
        return None
