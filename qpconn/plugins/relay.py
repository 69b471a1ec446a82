"""relay: mark clients allowed to relay, from ``relayclients`` and ``morerelayclients``.

Entries are single addresses (``192.0.2.7``, ``::1``), CIDR networks (``10.0.0.0/8``,
``2001:db8::/32``) or qpsmtpd-style prefixes ending in a dot or colon (``192.168.``,
``2001:db8:``). The verdict is made once per connection, at ``connect``, and stored in
``connection.relay_client`` where ``rcpt_ok`` reads it.
"""

from __future__ import annotations

import ipaddress

from qpconn.hooks.results import DECLINED, Result
from qpconn.plugins import Plugin

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_relay_entries(lines: list[str]) -> tuple[list[IPNetwork], list[str]]:
    """Networks and textual prefixes from config lines; a malformed entry is an error."""
    networks: list[IPNetwork] = []
    prefixes: list[str] = []
    for entry in lines:
        if entry.endswith((".", ":")) and "/" not in entry:
            prefixes.append(entry.lower())
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(
                f"relayclients: {entry!r} is not an address, network or prefix"
            ) from None
    return networks, prefixes


def ip_matches(ip: str, networks: list[IPNetwork], prefixes: list[str]) -> bool:
    """True when ``ip`` is in one of the networks or starts with one of the prefixes."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if any(address in network for network in networks):
        return True
    if prefixes:
        forms = {str(address)}
        if address.version == 6:
            forms.add(address.exploded)
        return any(form.startswith(prefix) for prefix in prefixes for form in forms)
    return False


class Relay(Plugin):
    """Sets ``relay_client`` for peers listed in ``relayclients``/``morerelayclients``."""

    def register(self) -> None:
        lines = self.config.lines("relayclients") + self.config.lines("morerelayclients")
        self.networks, self.prefixes = parse_relay_entries(lines)

    def hook_connect(self, transaction) -> Result:  # type: ignore[no-untyped-def]
        connection = transaction.connection
        if connection.remote_ip and ip_matches(connection.remote_ip, self.networks, self.prefixes):
            connection.relay_client = True
            connection.notes["relay"] = "relayclients"
        return DECLINED
