"""rhsbl: refuse senders whose domain is listed in right-hand-side block lists (``rhsbl_zones``).

At ``MAIL``, the sender's domain is looked up in every zone at once
(``spam.example.dbl.example``); a listing refuses the sender with ``550 5.7.1``. The null
sender, address literals and relay clients are not checked. Zone lines have the same
form as ``dnsbl_zones`` (see :mod:`qpconn.kit.blocklist`); ``%IP%`` in a zone's message
stands for the domain here.

Arguments: ``reject 1|0|naughty``, ``reject_type perm|temp|disconnect``,
``dns_error tempfail|ignore`` (every zone failing is ``450 4.4.3`` by default).
"""

from __future__ import annotations

from typing import Any

from qpconn.hooks.verdicts import POLICY_CHOICES, POLICY_DEFAULTS, RejectPolicy, record
from qpconn.kit.blocklist import check, parse_zones
from qpconn.kit.policy import parse_options
from qpconn.mail.address import Address, AddressError
from qpconn.plugins import Plugin


class Rhsbl(Plugin):
    """Looks up the sender's domain in every ``rhsbl_zones`` list, in parallel."""

    def register(self, *args: str) -> None:
        options = parse_options(self.name, args, POLICY_DEFAULTS, POLICY_CHOICES)
        self.policy = RejectPolicy.from_options(options)
        self.zones = parse_zones("rhsbl_zones", self.config.lines("rhsbl_zones"))

    async def hook_mail(self, transaction: Any, sender: Address, params: Any) -> Any:
        skip = self._skip_reason(transaction, sender)
        if skip is not None:
            record(transaction, self.name, "skip", skip, stage="mail")
            return None
        try:
            domain = (sender.host_ascii or "").lower().rstrip(".")
        except AddressError:
            record(transaction, self.name, "skip", "domain not convertible", stage="mail")
            return None
        outcome = await check(self.server, self.zones, domain, domain)
        listing = outcome.listed
        if listing is not None:
            why = listing.message or f"see {listing.zone}"
            return self.policy.fail(
                transaction,
                self.name,
                "mail",
                f"5.7.1 Mail from {domain} is not accepted: listed in {listing.zone}: {why}",
                reason=f"{domain} listed in {listing.zone} ({', '.join(listing.answers)})",
                scope="transaction",
                zone=listing.zone,
            )
        if outcome.errors and len(outcome.errors) == len(self.zones):
            return self.policy.fail(
                transaction,
                self.name,
                "mail",
                "4.4.3 Block list lookup failed; try again later",
                reason=f"lookup of {domain} failed: {', '.join(outcome.errors)}",
                temporary=True,
                scope="transaction",
            )
        record(transaction, self.name, "pass", f"{domain} not listed", stage="mail")
        return None

    def _skip_reason(self, transaction: Any, sender: Address) -> str | None:
        if not self.zones:
            return "no rhsbl_zones"
        if sender.is_null or sender.host is None:
            return "null sender"
        if sender.is_ip_literal:
            return "address literal"
        if transaction.connection.relay_client or transaction.connection.auth_user:
            return "relay client or authenticated user"
        return None
