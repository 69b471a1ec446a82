"""DNS queries for plugins: bounded in time, never raising, answers as plain Python values.

Every plugin that asks DNS (DNSBL, RHSBL, MX checks, SPF, DMARC ...) goes through
:func:`query` with the server's resolver (``self.server.resolver`` in a plugin), so they
all obey ``--dns-server`` and one timeout, and a broken resolver gives a documented
temporary result instead of a hang or a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.names import dns, error

__all__ = ["Answer", "query", "TYPES"]

TYPES = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "MX": dns.MX,
    "TXT": dns.TXT,
    "PTR": dns.PTR,
    "NS": dns.NS,
    "CNAME": dns.CNAME,
}


@dataclass(frozen=True)
class Answer:
    """The outcome of one query.

    ``status`` is ``"ok"`` (records found), ``"nodata"`` (the name exists, no record of
    that type), ``"nxdomain"``, or a temporary failure: ``"servfail"``, ``"timeout"``,
    ``"error"``. ``values`` holds the records as text (A/AAAA addresses, names without
    the final dot, TXT strings joined) or ``(preference, exchange)`` tuples for MX.
    """

    status: str
    values: list[Any] = field(default_factory=list)
    ttl: int = 0

    @property
    def temporary(self) -> bool:
        """The resolver could not say: callers should answer 4xx, not decide."""
        return self.status in ("servfail", "timeout", "error")


def _value(record: dns.RRHeader) -> Any:
    payload = record.payload
    if record.type in (dns.A, dns.AAAA):
        return payload.dottedQuad() if record.type == dns.A else _ipv6(payload.address)
    if record.type == dns.MX:
        return (payload.preference, payload.name.name.decode("ascii", "replace").rstrip("."))
    if record.type == dns.TXT:
        return b"".join(payload.data).decode("utf-8", "replace")
    return payload.name.name.decode("ascii", "replace").rstrip(".")


def _ipv6(packed: bytes) -> str:
    import ipaddress

    return str(ipaddress.IPv6Address(packed))


async def query(
    resolver: Any, name: str, rtype: str, clock: IReactorTime, timeout: float = 5.0
) -> Answer:
    """Ask ``resolver`` for ``name``'s ``rtype`` records within ``timeout`` seconds."""
    kind = TYPES[rtype]
    deferred = resolver.query(dns.Query(name, kind, dns.IN))
    deferred.addTimeout(timeout, clock)
    try:
        answers, _authority, _additional = await deferred
    except error.DNSNameError:
        return Answer("nxdomain")
    except error.DNSServerError:
        return Answer("servfail")
    except (defer.TimeoutError, error.DNSQueryTimeoutError):
        return Answer("timeout")
    except Exception:  # refused, malformed, anything else: the resolver could not say
        return Answer("error")
    records = [record for record in answers if record.type == kind]
    if not records:
        return Answer("nodata")
    return Answer("ok", [_value(record) for record in records], min(r.ttl for r in records))
