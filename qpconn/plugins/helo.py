"""helo: judge the name a client gives in HELO/EHLO, under ``policy lenient|rfc|strict``.

Spam software tends to lie in HELO in a few recognisable ways; real mail servers very
rarely do. The checks, by policy (each policy includes the ones before it):

* ``lenient`` (default): the name is in ``badhelo``; the client claims to be us (our
  ``me``, ``localhost``, our address) without being us; a bare IP address without the
  brackets RFC 5321 §4.1.3 requires; an address literal that is not the client's address.
* ``rfc``: the name must be a syntactically valid domain name that resolves (A, AAAA or
  MX, asked at once): RFC 5321 §4.1.1.1 wants the client's primary host name.
* ``strict``: the name must contain a dot, and its A/AAAA records must include the
  client's address.

A refusal is ``550 5.7.1`` and the client may say HELO again; a DNS failure is
``450 4.4.3``. Relay clients are not judged. "Claims to be us" means: not a relay client,
and connecting from another address than the one it reached us on.

Arguments: ``policy lenient|rfc|strict``, ``reject 1|0|naughty``,
``reject_type perm|temp|disconnect``, ``dns_error tempfail|ignore``.
"""

from __future__ import annotations

import re
from typing import Any

from qpconn.hooks.verdicts import POLICY_CHOICES, POLICY_DEFAULTS, RejectPolicy, record
from qpconn.kit.policy import ask_all, parse_ip, parse_options
from qpconn.plugins import Plugin

POLICIES = ("lenient", "rfc", "strict")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_LOCALHOST = frozenset({"localhost", "localhost.localdomain"})
Failure = tuple[str, str, bool]  # (message, reason, temporary)


def valid_domain(name: str) -> bool:
    """RFC 1123 host name syntax (letters, digits, hyphens; labels up to 63 octets)."""
    name = name.rstrip(".")
    if not name or len(name) > 253:
        return False
    return all(_LABEL.match(label) for label in name.lower().split("."))


def literal_ip(name: str) -> Any:
    """The address of ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``, or None if not a literal."""
    if not (name.startswith("[") and name.endswith("]")):
        return None
    inner = name[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    elif ":" in inner:
        return None  # RFC 5321 §4.1.3: IPv6 literals are tagged
    return parse_ip(inner)


class Helo(Plugin):
    """Checks the HELO/EHLO argument; see the module docstring for what each policy adds."""

    def register(self, *args: str) -> None:
        options = parse_options(
            self.name,
            args,
            {**POLICY_DEFAULTS, "policy": "lenient"},
            {**POLICY_CHOICES, "policy": POLICIES},
        )
        self.policy = RejectPolicy.from_options(options)
        self.level = POLICIES.index(options["policy"])
        self.exact: set[str] = set()
        self.patterns: list[re.Pattern[str]] = []
        for line in self.config.lines("badhelo"):
            if line.startswith("/") and line.endswith("/") and len(line) > 2:
                try:
                    self.patterns.append(re.compile(line[1:-1], re.IGNORECASE))
                except re.error as exc:
                    raise ValueError(f"badhelo: bad pattern {line!r}: {exc}") from None
            else:
                self.exact.add(line.lower().rstrip("."))

    async def hook_helo(self, transaction: Any, host: str) -> Any:
        return await self._judge(transaction, host, "helo")

    async def hook_ehlo(self, transaction: Any, host: str) -> Any:
        return await self._judge(transaction, host, "ehlo")

    async def _judge(self, transaction: Any, host: str, stage: str) -> Any:
        connection = transaction.connection
        if connection.relay_client:
            record(transaction, self.name, "skip", "relay client", stage=stage, helo=host)
            return None
        failure = self._lenient(connection, host)
        if failure is None and self.level >= 1:
            failure = await self._resolvable(connection, host)
        if failure is None:
            record(transaction, self.name, "pass", POLICIES[self.level], stage=stage, helo=host)
            return None
        message, reason, temporary = failure
        return self.policy.fail(
            transaction, self.name, stage, message, reason=reason, temporary=temporary, helo=host
        )

    def _lenient(self, connection: Any, host: str) -> Failure | None:
        name = host.lower().rstrip(".")
        if name in self.exact or any(p.search(host) for p in self.patterns):
            return f"5.7.1 HELO name {host} is not accepted here", "in badhelo", False
        if parse_ip(host) is not None:
            return (
                f"5.7.1 An address in HELO must be in brackets: [{host}]",
                "bare IP address",
                False,
            )
        literal = literal_ip(host)
        stranger = connection.remote_ip != connection.local_ip
        if literal is not None:
            claimed = str(literal)
            if claimed != connection.remote_ip:
                return (
                    f"5.7.1 You are not {host}: your address is [{connection.remote_ip}]",
                    f"forged address literal {claimed}",
                    False,
                )
            return None
        if host.startswith("["):
            return f"5.7.1 HELO {host} is not a valid address literal", "bad literal", False
        ours = {self.config.me.lower().rstrip("."), *_LOCALHOST}
        if stranger and name in ours:
            return f"5.7.1 You are not {host}", "claims to be us", False
        return None

    async def _resolvable(self, connection: Any, host: str) -> Failure | None:
        if literal_ip(host) is not None:
            return None
        if not valid_domain(host):
            return f"5.7.1 HELO name {host} is not a valid host name", "invalid syntax", False
        name = host.rstrip(".")
        if self.level >= 2 and "." not in name:
            return f"5.7.1 HELO name {host} is not fully qualified", "no dot", False
        a, aaaa, mx = await ask_all(self.server, [(name, "A"), (name, "AAAA"), (name, "MX")])
        answers = (a, aaaa, mx)
        if not any(answer.status == "ok" for answer in answers):
            if any(answer.temporary for answer in answers):
                statuses = "/".join(answer.status for answer in answers)
                return (
                    f"4.4.3 Could not resolve HELO name {host}; try again later",
                    f"lookup failed ({statuses})",
                    True,
                )
            return f"5.7.1 HELO name {host} does not resolve", "does not resolve", False
        if self.level >= 2:
            addresses = {str(parse_ip(value)) for value in a.values + aaaa.values}
            if connection.remote_ip not in addresses:
                if a.temporary or aaaa.temporary:
                    return (
                        f"4.4.3 Could not resolve HELO name {host}; try again later",
                        "address lookup failed",
                        True,
                    )
                return (
                    f"5.7.1 HELO name {host} does not resolve to your address "
                    f"[{connection.remote_ip}]",
                    "does not resolve to the client",
                    False,
                )
        return None
