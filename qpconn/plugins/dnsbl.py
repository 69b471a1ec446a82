"""dnsbl: refuse clients whose address is listed in DNS block lists (``dnsbl_zones``).

Every zone is asked at once when the client connects. With ``stage rcpt`` (the default,
as in qpsmtpd) the greeting does not wait for the answers: they are awaited at the first
``RCPT``, which is then refused, so the client learns why, and mail to ``postmaster``
and ``abuse`` still gets through (RFC 5321 §4.5.1, and a listed sender must be able to
reach us about the listing). With ``stage connect`` the client is refused before the
greeting. Relay clients and addresses in ``dnsbl_allow`` are never looked up, and a
client that authenticated (AUTH) before ``RCPT`` is not refused: a user sending from a
listed dynamic address is who submission is for.

Arguments (qpsmtpd's): ``reject 1|0|naughty``, ``reject_type perm|temp|disconnect``,
``stage rcpt|connect``, ``dns_error tempfail|ignore``. Every zone answering with an error
(and none listing) is a temporary failure, ``450 4.4.3``, unless ``dns_error ignore``.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet import defer

from qpconn.hooks.verdicts import POLICY_CHOICES, POLICY_DEFAULTS, RejectPolicy, record
from qpconn.kit.blocklist import Outcome, check, parse_zones, reversed_ip
from qpconn.kit.policy import NetworkList, parse_options
from qpconn.mail.address import Address
from qpconn.plugins import Plugin

#: mail to these local parts is never refused for a listing
EXEMPT = frozenset({"postmaster", "abuse"})
#: connection note: the outcome once known (``{"listed": zone or None, ...}``)
NOTE = "dnsbl"


class Dnsbl(Plugin):
    """Looks up the client's address in every ``dnsbl_zones`` list, in parallel."""

    def register(self, *args: str) -> None:
        options = parse_options(
            self.name,
            args,
            {**POLICY_DEFAULTS, "stage": "rcpt"},
            {**POLICY_CHOICES, "stage": ("rcpt", "connect")},
        )
        self.policy = RejectPolicy.from_options(options)
        self.stage = options["stage"]
        self.zones = parse_zones("dnsbl_zones", self.config.lines("dnsbl_zones"))
        self.allow = NetworkList("dnsbl_allow", self.config.lines("dnsbl_allow"))
        # Lookups started at connect and not yet awaited, per connection (dies with it).
        self._pending: weakref.WeakKeyDictionary[Any, defer.Deferred[Outcome]] = (
            weakref.WeakKeyDictionary()
        )
        # The refusal decided at the first RCPT, given to every later one.
        self._replies: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def _skip_reason(self, connection: Any) -> str | None:
        if not self.zones:
            return "no dnsbl_zones"
        if connection.remote_ip is None or reversed_ip(connection.remote_ip) is None:
            return "no IP address"
        if connection.relay_client:
            return "relay client"
        if connection.remote_ip in self.allow:
            return "in dnsbl_allow"
        return None

    async def hook_connect(self, transaction: Any) -> Any:
        connection = transaction.connection
        skip = self._skip_reason(connection)
        if skip is not None:
            record(transaction, self.name, "skip", skip, stage="connect")
            connection.notes[NOTE] = {"listed": None, "skipped": skip}
            return None
        ip = connection.remote_ip
        lookup = defer.ensureDeferred(check(self.server, self.zones, reversed_ip(ip) or "", ip))
        if self.stage == "connect" or self.policy.reject == "naughty":
            # The naughty plugin may act at connect: the verdict must be in by then.
            return self._judge(transaction, await lookup, "connect")
        self._pending[connection] = lookup
        return None

    async def hook_rcpt(self, transaction: Any, recipient: Address, params: Any) -> Any:
        connection = transaction.connection
        lookup = self._pending.pop(connection, None)
        if lookup is not None:
            outcome = await lookup
            self._replies[connection] = self._judge(transaction, outcome, "rcpt")
        reply = self._replies.get(connection)
        if reply is None or connection.relay_client or connection.auth_user:
            return None  # an authenticated user on a listed (dynamic) address may send
        if (recipient.user or "").lower() in EXEMPT:
            return None
        return reply

    def _judge(self, transaction: Any, outcome: Outcome, stage: str) -> Any:
        """Record the verdict; the hook result that refuses (or None)."""
        connection = transaction.connection
        ip = connection.remote_ip
        listing = outcome.listed
        connection.notes[NOTE] = {
            "listed": listing.zone if listing else None,
            "answers": list(listing.answers) if listing else [],
            "errors": list(outcome.errors),
        }
        if listing is not None:
            why = listing.message or f"see {listing.zone}"
            return self.policy.fail(
                transaction,
                self.name,
                stage,
                f"5.7.1 Your address {ip} is listed in {listing.zone}: {why}",
                reason=f"listed in {listing.zone} ({', '.join(listing.answers)})",
                zone=listing.zone,
            )
        if outcome.errors and len(outcome.errors) == len(self.zones):
            return self.policy.fail(
                transaction,
                self.name,
                stage,
                "4.4.3 Block list lookup failed; try again later",
                reason=f"lookup failed: {', '.join(outcome.errors)}",
                temporary=True,
            )
        reason = "not listed" + (
            f" (failed: {', '.join(outcome.errors)})" if outcome.errors else ""
        )
        record(transaction, self.name, "pass", reason, stage=stage)
        return None
