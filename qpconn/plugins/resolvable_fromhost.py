"""resolvable_fromhost: refuse senders whose domain cannot receive mail.

A bounce to such a sender could never be delivered, so the message is refused at
``MAIL`` while the client can still tell its user. The sender's domain must have an MX
record, or (without one, RFC 5321 §5.1) an A or AAAA record:

* MX found: accepted; but a *null MX* (a single ``0 .`` record, RFC 7505) says the domain
  never receives mail: ``550 5.7.27 Sender address has null MX`` (RFC 7505 §4.2; its
  ``556 5.1.10`` is for a *recipient* domain, which a sending MTA reports, not us);
* the domain does not exist, or has neither MX nor address: ``550 5.1.8``;
* a lookup failed (timeout, SERVFAIL): ``450 4.4.3``, try again later.

The null sender, address literals and relay clients are not checked.

Arguments: ``reject 1|0|naughty``, ``reject_type perm|temp|disconnect``,
``dns_error tempfail|ignore``.
"""

from __future__ import annotations

from typing import Any

from qpconn.hooks.verdicts import POLICY_CHOICES, POLICY_DEFAULTS, RejectPolicy, record
from qpconn.kit.policy import ask, ask_all, parse_options
from qpconn.mail.address import Address, AddressError
from qpconn.plugins import Plugin

Failure = tuple[str, str, bool]  # (message, reason, temporary)


def is_null_mx(records: list[tuple[int, str]]) -> bool:
    """RFC 7505: exactly one MX, preference 0, exchange the root (``.``)."""
    return len(records) == 1 and records[0][0] == 0 and records[0][1].strip(".") == ""


class ResolvableFromhost(Plugin):
    """Asks DNS whether the sender's domain can receive mail (MX, else A/AAAA)."""

    def register(self, *args: str) -> None:
        options = parse_options(self.name, args, POLICY_DEFAULTS, POLICY_CHOICES)
        self.policy = RejectPolicy.from_options(options)

    async def hook_mail(self, transaction: Any, sender: Address, params: Any) -> Any:
        skip = None
        if sender.is_null or sender.host is None:
            skip = "null sender"
        elif sender.is_ip_literal:
            skip = "address literal"
        elif transaction.connection.relay_client or transaction.connection.auth_user:
            skip = "relay client or authenticated user"
        domain = ""
        if skip is None:
            try:
                domain = (sender.host_ascii or "").rstrip(".").lower()
            except AddressError:
                skip = "domain not convertible"
        if skip is not None:
            record(transaction, self.name, "skip", skip, stage="mail")
            return None
        failure = await self._check(domain)
        if failure is None:
            record(transaction, self.name, "pass", f"{domain} resolves", stage="mail")
            return None
        message, reason, temporary = failure
        return self.policy.fail(
            transaction,
            self.name,
            "mail",
            message,
            reason=reason,
            temporary=temporary,
            scope="transaction",
            domain=domain,
        )

    async def _check(self, domain: str) -> Failure | None:
        mx = await ask(self.server, domain, "MX")
        if mx.status == "ok":
            if is_null_mx(mx.values):
                return "5.7.27 Sender address has null MX", f"{domain} has a null MX", False
            return None
        if mx.temporary:
            return self._temporary(domain, f"MX lookup: {mx.status}")
        if mx.status == "nxdomain":
            return self._missing(domain, "does not exist")
        a, aaaa = await ask_all(self.server, [(domain, "A"), (domain, "AAAA")])
        if a.status == "ok" or aaaa.status == "ok":
            return None
        if a.temporary or aaaa.temporary:
            return self._temporary(domain, f"address lookup: {a.status}/{aaaa.status}")
        return self._missing(domain, "has no MX and no address")

    @staticmethod
    def _missing(domain: str, why: str) -> Failure:
        return f"5.1.8 Sender domain {domain} {why}", f"{domain} {why}", False

    @staticmethod
    def _temporary(domain: str, why: str) -> Failure:
        return f"4.4.3 Could not resolve sender domain {domain}; try again later", why, True
