"""fcrdns: refuse clients without forward-confirmed reverse DNS (FCrDNS).

The server looks the client up before ``connect`` (its address's PTR names, then their
addresses); this plugin only reads the outcome: ``connection.remote_host_verified``, and
``connection.notes["rdns_error"]`` for why it failed. A client whose PTR name does not
resolve back to it, or that has no PTR at all, is refused with ``550 5.7.25`` (RFC 7372:
"Reverse DNS validation failed"); when the lookup itself failed (timeout, SERVFAIL) the
client is told ``450 4.7.25`` to come back later, since that failure may be ours.

Relay clients are not judged, nor is anyone when the server runs with ``--no-rdns``
(there is nothing to judge: a warning is logged at start).

Arguments: ``reject 1|0|naughty``, ``reject_type perm|temp|disconnect``,
``dns_error tempfail|ignore``.
"""

from __future__ import annotations

from typing import Any

from qpconn.hooks.verdicts import POLICY_CHOICES, POLICY_DEFAULTS, RejectPolicy, record
from qpconn.kit.policy import parse_options
from qpconn.plugins import Plugin

#: rdns_error words (see qpconn.server.lookup.ReverseDNS) that mean "could not find out"
TEMPORARY = frozenset({"timeout", "servfail", "refused", "error"})


def is_temporary(error: str | None) -> bool:
    """True for a lookup failure (of either step), not for an answer that says no."""
    if not error:
        return False
    return error.removeprefix("forward-") in TEMPORARY


class Fcrdns(Plugin):
    """Judges the FCrDNS result the server computed before ``connect``."""

    def register(self, *args: str) -> None:
        options = parse_options(self.name, args, POLICY_DEFAULTS, POLICY_CHOICES)
        self.policy = RejectPolicy.from_options(options)

    def attach(self, server: Any) -> None:
        super().attach(server)
        if not getattr(server.lookups, "rdns", True):
            self.log.warn("fcrdns: reverse DNS lookups are off (--no-rdns); nothing is judged")

    def hook_connect(self, transaction: Any) -> Any:
        connection = transaction.connection
        skip = None
        if connection.remote_ip is None:
            skip = "no IP address"
        elif connection.relay_client:
            skip = "relay client"
        elif not getattr(self.server.lookups, "rdns", True):
            skip = "reverse DNS lookups are off"
        elif connection.notes.get("rdns_error") == "loopback":
            skip = "loopback client"
        if skip is not None:
            record(transaction, self.name, "skip", skip, stage="connect")
            return None
        name = connection.remote_host
        if connection.remote_host_verified:
            record(transaction, self.name, "pass", f"{name} confirmed", stage="connect")
            return None
        error = connection.notes.get("rdns_error") or "unverified"
        ip = connection.remote_ip
        if is_temporary(error):
            return self.policy.fail(
                transaction,
                self.name,
                "connect",
                f"4.7.25 Reverse DNS lookup of {ip} failed; try again later",
                reason=f"lookup failed: {error}",
                temporary=True,
            )
        if name is None:
            message = f"5.7.25 Your address {ip} has no reverse DNS name"
        else:
            message = f"5.7.25 Your reverse DNS name {name} does not resolve to {ip}"
        return self.policy.fail(
            transaction, self.name, "connect", message, reason=f"not confirmed: {error}"
        )
