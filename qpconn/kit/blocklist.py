"""DNS block lists (RFC 5782), shared by the ``dnsbl`` (addresses) and ``rhsbl`` (domains) plugins.

A listing is an A record under the zone: ``2.0.0.127.zen.example`` for the address
127.0.0.2, ``spam.example.dbl.example`` for a domain. Lists answer with addresses in
127.0.0.0/8, and some answer with 127.255.255.x to say "you may not query me" (a public
resolver, a quota): those answers are errors of the list, not listings, so they are
ignored unless a zone line asks for them explicitly.

Zone lines (``dnsbl_zones``, ``rhsbl_zones``)::

    zen.example                         # any 127.0.0.0/8 answer (but 127.255.255.x)
    bl.example:Listed, see https://bl.example/?ip=%IP%       # qpsmtpd's form: own message
    zen.example 127.0.0.2,127.0.0.4/30  # only these answers count
    zen.example /^127\\.0\\.0\\.1[01]$/ Your address %IP% is a known spam source
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qpconn.kit.policy import ask, ask_all, parse_network

__all__ = ["Zone", "Listing", "Outcome", "parse_zones", "reversed_ip", "check"]

_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_LIST_ERRORS = ipaddress.ip_network("127.255.255.0/24")
#: longest TXT reason quoted to a client: enough for a URL, not a novel
MAX_TXT = 200


def _default_match(answer: str) -> bool:
    try:
        ip = ipaddress.ip_address(answer)
    except ValueError:
        return False
    return ip in _LOOPBACK and ip not in _LIST_ERRORS


@dataclass(frozen=True)
class Zone:
    """One list: its DNS zone, which answers count as a listing, an optional own message."""

    name: str
    match: Callable[[str], bool] = _default_match
    message: str | None = None
    spec: str = ""


@dataclass(frozen=True)
class Listing:
    """The subject (address or domain) is listed in ``zone`` with these answers."""

    zone: str
    answers: tuple[str, ...]
    message: str


@dataclass
class Outcome:
    """What every zone said: the listings (in zone order) and the zones that failed."""

    listings: list[Listing] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def listed(self) -> Listing | None:
        return self.listings[0] if self.listings else None


def _matcher(setting: str, spec: str) -> Callable[[str], bool]:
    if spec.startswith("/") and spec.endswith("/") and len(spec) > 2:
        try:
            pattern = re.compile(spec[1:-1])
        except re.error as exc:
            raise ValueError(f"{setting}: bad answer pattern {spec!r}: {exc}") from None
        return lambda answer: bool(pattern.search(answer))
    networks = [parse_network(setting, part) for part in spec.split(",") if part]
    if not networks:
        raise ValueError(f"{setting}: empty answer list")

    def match(answer: str) -> bool:
        try:
            ip = ipaddress.ip_address(answer)
        except ValueError:
            return False
        return any(ip in network for network in networks)

    return match


def parse_zones(setting: str, lines: Iterable[str]) -> list[Zone]:
    """Zone lines as in the module docstring; a malformed one raises ValueError."""
    zones = []
    for line in lines:
        head = re.match(r"[^\s:]+", line)
        if head is None:
            raise ValueError(f"{setting}: {line!r} does not start with a zone name")
        name = head.group(0).lower().strip(".")
        rest = line[head.end() :]
        if rest.startswith(":"):
            zones.append(Zone(name, message=rest[1:].strip() or None, spec=line))
            continue
        parts = rest.split(None, 1)
        if not parts:
            zones.append(Zone(name, spec=line))
            continue
        message = parts[1].strip() if len(parts) > 1 else None
        zones.append(Zone(name, _matcher(setting, parts[0]), message, line))
    return zones


def reversed_ip(ip: str) -> str | None:
    """The DNSBL query prefix of an address: reversed octets, or nibbles for IPv6."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    pointer = address.reverse_pointer
    return pointer.rsplit(".in-addr.arpa" if address.version == 4 else ".ip6.arpa", 1)[0]


async def check(
    server: Any, zones: Sequence[Zone], subject: str, shown: str, *, txt: bool = True
) -> Outcome:
    """Ask every zone about ``subject`` (a reversed address or a domain) at once.

    ``shown`` replaces ``%IP%`` in the zones' own messages. For the first listing without
    an own message, the list's TXT record (when ``txt``) gives the reason.
    """
    answers = await ask_all(server, [(f"{subject}.{zone.name}", "A") for zone in zones])
    outcome = Outcome()
    for zone, answer in zip(zones, answers, strict=True):
        if answer.temporary:
            outcome.errors.append(zone.name)
            continue
        hits = tuple(value for value in answer.values if zone.match(value))
        if answer.status == "ok" and hits:
            message = (zone.message or "").replace("%IP%", shown)
            outcome.listings.append(Listing(zone.name, hits, message))
    first = outcome.listed
    if first is not None and not first.message:
        reason = ""
        if txt:
            found = await ask(server, f"{subject}.{first.zone}", "TXT")
            if found.status == "ok" and found.values:
                reason = " ".join(str(value) for value in found.values)[:MAX_TXT]
        outcome.listings[0] = Listing(first.zone, first.answers, reason)
    return outcome
