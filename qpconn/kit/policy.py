"""Small pieces the policy plugins share: argument parsing, DNS, address and network lists.

Kept out of :mod:`qpconn.plugins` so that every module there is a plugin. Everything here
is strict at load time (a bad argument or config line raises ``ValueError``, so the
server does not start with a typo) and cheap per session.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet import defer

from qpconn.kit.dns import Answer, query
from qpconn.mail.address import Address

__all__ = [
    "parse_options",
    "ask",
    "ask_all",
    "NetworkList",
    "AddressList",
    "parse_ip",
]

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_options(
    plugin: str,
    args: Iterable[str],
    defaults: Mapping[str, str],
    choices: Mapping[str, tuple[str, ...]] | None = None,
    numbers: Iterable[str] = (),
) -> dict[str, str]:
    """qpsmtpd-style ``key value`` argument pairs, checked against what the plugin knows.

    ``key=value`` in one word means the same (the form the forwarding plugins use, so an
    administrator need not remember which plugin takes which); a word is read that way
    only when it is not itself a known key and the text before its ``=`` is one.

    Unknown keys, a key without a value, a value not in ``choices`` and a non-number for
    a key in ``numbers`` are errors: the server refuses to start rather than run a
    policy the administrator did not write.
    """
    words = list(args)
    options = dict(defaults)
    numeric = set(numbers)
    position = 0
    while position < len(words):  # bounded: every pass consumes one or two words
        word = words[position]
        key, equals, value = word.partition("=")
        if word not in defaults and equals and key in defaults:
            position += 1
        elif word in defaults:
            if position + 1 >= len(words):
                raise ValueError(f"{plugin}: {word!r} needs a value ({word} VALUE or {word}=VALUE)")
            key, value = word, words[position + 1]
            position += 2
        else:
            known = ", ".join(sorted(defaults))
            raise ValueError(f"{plugin}: unknown argument {key!r} (known: {known})")
        allowed = (choices or {}).get(key)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{plugin}: {key} must be one of {'|'.join(allowed)}, not {value!r}")
        if key in numeric:
            try:
                float(value)
            except ValueError:
                raise ValueError(f"{plugin}: {key} must be a number, not {value!r}") from None
        options[key] = value
    return options


async def ask(server: Any, name: str, rtype: str) -> Answer:
    """One DNS query through the server's resolver, bounded by the server's DNS timeout."""
    timeout = server.lookups.dns_timeout or 5.0
    return await query(server.resolver, name, rtype, server.clock, timeout)


async def ask_all(server: Any, questions: Iterable[tuple[str, str]]) -> list[Answer]:
    """Several queries at once (so the wait is the slowest, not the sum); answers in order."""
    waits = [defer.ensureDeferred(ask(server, name, rtype)) for name, rtype in questions]
    return list(await defer.gatherResults(waits))


def parse_ip(text: str) -> IP | None:
    """An address from text (IPv4-mapped IPv6 unwrapped), or None."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
        return ip.ipv4_mapped  # type: ignore[union-attr]
    return ip


def parse_network(setting: str, text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{setting}: {text!r} is not an address or network") from None


class NetworkList:
    """Addresses, CIDR networks and qpsmtpd-style prefixes (``192.168.``) from a setting.

    Asked about every new connection (relay clients, the connection limits' exceptions,
    XCLIENT's trusted proxies), mostly for the same few addresses, so answers are kept per
    address string: a list never changes once built, and parsing an address costs more
    than the rest of the question. At most :attr:`REMEMBERED` answers are kept.
    """

    #: answers kept per address before they are all forgotten (a bound on memory)
    REMEMBERED = 4096

    def __init__(self, setting: str, entries: Iterable[str]) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.prefixes: list[str] = []
        for entry in entries:
            if entry.endswith((".", ":")) and "/" not in entry:
                self.prefixes.append(entry.lower())
            else:
                self.networks.append(parse_network(setting, entry))
        self._answers: dict[str, bool] = {}

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str) or not (self.networks or self.prefixes):
            return False
        answers = self._answers
        known = answers.get(ip)
        if known is None:
            if len(answers) >= self.REMEMBERED:
                answers.clear()
            known = answers[ip] = self._matches(ip)
        return known

    def _matches(self, ip: str) -> bool:
        address = parse_ip(ip)
        if address is None:
            return False
        if any(address in network for network in self.networks):
            return True
        forms = {str(address), getattr(address, "exploded", str(address))}
        return any(form.startswith(prefix) for prefix in self.prefixes for form in forms)

    def __bool__(self) -> bool:
        return bool(self.networks or self.prefixes)


class AddressList:
    """``badmailfrom``-style lines: ``user@host``, ``@host`` or ``/regex/``, then a message.

    Addresses and domains compare without regard to case; a regex is searched in the
    address text (``user@host``, no brackets) ignoring case. Text after the entry
    (separated by spaces) is the reason given to the client.
    """

    def __init__(self, setting: str, lines: Iterable[str]) -> None:
        self.addresses: dict[str, str | None] = {}
        self.domains: dict[str, str | None] = {}
        self.patterns: list[tuple[re.Pattern[str], str | None]] = []
        for line in lines:
            entry, message = _entry_and_message(line)
            if entry.startswith("/") and entry.endswith("/") and len(entry) > 2:
                try:
                    self.patterns.append((re.compile(entry[1:-1], re.IGNORECASE), message))
                except re.error as exc:
                    raise ValueError(f"{setting}: bad pattern {entry!r}: {exc}") from None
            elif entry.startswith("@") and len(entry) > 1:
                self.domains.setdefault(entry[1:].lower().rstrip("."), message)
            elif "@" in entry:
                self.addresses.setdefault(entry.lower(), message)
            else:
                raise ValueError(f"{setting}: {entry!r} is not user@host, @host or /regex/")

    def match(self, address: Address) -> tuple[str, str | None] | None:
        """(the matching entry, its message) for ``address``, or None."""
        if address.is_null or address.user is None:
            return None
        text = address.address
        lowered = text.lower()
        if lowered in self.addresses:
            return lowered, self.addresses[lowered]
        domain = (address.host or "").lower().rstrip(".")
        if domain in self.domains:
            return "@" + domain, self.domains[domain]
        for pattern, message in self.patterns:
            if pattern.search(text):
                return "/" + pattern.pattern + "/", message
        return None


def _entry_and_message(line: str) -> tuple[str, str | None]:
    parts = line.split(None, 1)
    return parts[0], (parts[1].strip() if len(parts) > 1 else None)
