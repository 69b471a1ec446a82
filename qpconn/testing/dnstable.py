"""The DNS answer table of :func:`qpconn.testing.run_session`: a resolver that asks no one.

It maps ``(name, type)`` to answers: a list of values (``"192.0.2.1"``, ``"mx.example"``,
``"10 mx.example"`` for MX, a string for TXT) or one of ``"nxdomain"``, ``"servfail"``,
``"timeout"``. A PTR key may be written with the IP address itself. A name not in the
table is NXDOMAIN; a name in the table asked for another type has no records of it
(NODATA), as a real server answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.names.common import ResolverBase

__all__ = ["DNSTable"]

_SPECIAL = {
    "nxdomain": dns_error.DNSNameError,
    "servfail": dns_error.DNSServerError,
}


def _record(name: bytes, kind: int, value: Any) -> Any:
    text = str(value)
    if kind == dns.A:
        return dns.Record_A(text)
    if kind == dns.AAAA:
        return dns.Record_AAAA(text)
    if kind == dns.MX:
        preference, _, host = text.partition(" ")
        return dns.Record_MX(int(preference), host.encode())
    if kind == dns.TXT:
        return dns.Record_TXT(*(v.encode() for v in (value if isinstance(value, list) else [text])))
    if kind in (dns.PTR, dns.CNAME, dns.NS):
        return {dns.PTR: dns.Record_PTR, dns.CNAME: dns.Record_CNAME, dns.NS: dns.Record_NS}[kind](
            text.encode()
        )
    raise ValueError(f"DNSTable: no support for record type {dns.QUERY_TYPES.get(kind, kind)}")


class DNSTable(ResolverBase):
    """A resolver answering from a table (see the module docstring); records questions.

    ``questions`` lists every ``(name, type)`` asked, in order, so a test can check what a
    plugin looked up as well as what it made of the answer.
    """

    def __init__(self, table: Mapping[tuple[str, str], Any] | None = None, ttl: int = 300) -> None:
        super().__init__()
        self.ttl = ttl
        self.questions: list[tuple[str, str]] = []
        self.table: dict[tuple[str, str], Any] = {}
        for (name, rtype), answer in (table or {}).items():
            rtype = rtype.upper()
            if rtype == "PTR":
                try:
                    name = ipaddress.ip_address(name).reverse_pointer
                except ValueError:
                    pass
            self.table[(name.lower().rstrip("."), rtype)] = answer

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
        text = name.decode("ascii", "replace").lower().rstrip(".")
        rtype = dns.QUERY_TYPES.get(type, str(type))
        self.questions.append((text, rtype))
        answer = self.table.get((text, rtype))
        if answer is None:
            if any(known == text for known, _ in self.table):
                return defer.succeed(([], [], []))  # the name exists: NODATA, not NXDOMAIN
            return defer.fail(dns_error.DNSNameError(text))
        if isinstance(answer, str) and answer in _SPECIAL:
            return defer.fail(_SPECIAL[answer](text))
        if answer == "timeout":
            return defer.Deferred()  # the caller's own deadline (on the fake clock) ends it
        values = answer if isinstance(answer, list | tuple) else [answer]
        records = [
            dns.RRHeader(name, type, cls, self.ttl, _record(name, type, value)) for value in values
        ]
        return defer.succeed((records, [], []))
