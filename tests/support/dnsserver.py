"""A real, in-process DNS server on loopback for tests.

Plugins that talk DNS (reverse lookups, DNSBL, SPF, DKIM) are best tested
against an actual server speaking the wire protocol, because that exercises
the same code paths (encoding, rcodes, truncation, timeouts) as production.
This module runs Twisted's :class:`~twisted.names.server.DNSServerFactory` on
``127.0.0.1`` (UDP *and* TCP on the same port, so truncated answers can be
retried over TCP) with an in-memory authority built from a plain mapping::

    zone = {
        "1.0.0.127.in-addr.arpa": [("PTR", "good.test.", 300)],
        "good.test": [("A", "127.0.0.1", 300)],
        "txt.test": [("TXT", "v=spf1 -all", 60)],
        "mx.test": [("MX", (10, "mail.test."), 60)],
    }
    server = start_dns_server(zone, servfail={"bad.test"}, hang={"slow.test"})
    host, port = server.address
    ...
    yield server.stop()

Record tuples are ``(TYPE, value)`` or ``(TYPE, value, ttl)``.  Supported
types: A, AAAA, PTR, CNAME, NS, TXT, MX.  Name values may be ``bytes`` to
inject hostile octets (CR, LF, spaces ...).  A TXT value may be one string or
a sequence of strings; strings longer than 255 octets are split into
character-strings automatically (handy for DKIM keys).  Names not in the
zone answer NXDOMAIN; names in ``servfail``/``refused`` answer that rcode;
names in ``hang`` never get an answer; names in ``delay`` are answered after
that many seconds.  UDP answers over 512 octets are sent empty with the TC bit
set, as real servers do, so clients retry over TCP.  All of these may be
mutated while the server runs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from twisted.internet import defer, task
from twisted.internet import error as ierror
from twisted.internet.interfaces import IListeningPort
from twisted.names import common, dns, error, server
from twisted.python.failure import Failure

RecordSpec = tuple[Any, ...]
Zone = Mapping[str, Sequence[RecordSpec]]

DEFAULT_TTL = 300


def _key(name: bytes | str) -> str:
    """Normalise a DNS name for lookups: DNS is case-insensitive."""
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return name.lower().rstrip(".")


def _name_bytes(value: bytes | str) -> bytes:
    """Keep bytes as given (so tests can inject hostile octets); encode text.

    ASCII text is passed through verbatim rather than via IDNA, because the
    IDNA codec rejects some deliberately malformed names tests want to serve.
    """
    if isinstance(value, bytes):
        return value
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        return dns.domainString(value)


def _txt_strings(value: bytes | str | Iterable[bytes | str]) -> list[bytes]:
    """Turn a TXT value into 255-octet character-strings."""
    items = [value] if isinstance(value, (bytes, str)) else list(value)
    out: list[bytes] = []
    for item in items:
        data = item.encode("utf-8") if isinstance(item, str) else item
        out.extend(data[i : i + 255] for i in range(0, len(data), 255) or [0])
    return out


def make_record(rtype: str, value: Any, ttl: int) -> Any:
    """Build a ``twisted.names`` record payload from a zone tuple."""
    rtype = rtype.upper()
    if rtype == "A":
        return dns.Record_A(str(ipaddress.IPv4Address(value)), ttl=ttl)
    if rtype == "AAAA":
        return dns.Record_AAAA(str(ipaddress.IPv6Address(value)), ttl=ttl)
    if rtype in ("PTR", "CNAME", "NS"):
        cls = {"PTR": dns.Record_PTR, "CNAME": dns.Record_CNAME, "NS": dns.Record_NS}
        return cls[rtype](_name_bytes(value), ttl=ttl)
    if rtype == "TXT":
        return dns.Record_TXT(*_txt_strings(value), ttl=ttl)
    if rtype == "MX":
        preference, exchange = value
        return dns.Record_MX(int(preference), _name_bytes(exchange), ttl=ttl)
    raise ValueError(f"unsupported record type {rtype!r}")


class _ServFail(Exception):
    """Raised by the authority to make the server answer SERVFAIL."""


class _Refused(Exception):
    """Raised by the authority to make the server answer REFUSED."""


class ZoneAuthority(common.ResolverBase):
    """An in-memory authority answering from a mutable mapping.

    Every query is appended to :attr:`queries` as ``(name, TYPE)`` so tests
    can assert how many lookups really reached the wire.
    """

    def __init__(self, owner: DNSTestServer) -> None:
        common.ResolverBase.__init__(self)
        self._owner = owner
        self.queries: list[tuple[str, str]] = []

    def _records(self, name: str) -> list[tuple[int, Any]]:
        specs = self._owner.zone.get(name)
        if specs is None:
            # Accept keys written with a trailing dot or in mixed case.
            for key, value in self._owner.zone.items():
                if _key(key) == name:
                    specs = value
                    break
        out = []
        for spec in specs or ():
            rtype, value = spec[0], spec[1]
            ttl = int(spec[2]) if len(spec) > 2 else DEFAULT_TTL
            record = make_record(rtype, value, ttl)
            out.append((record.TYPE, record))
        return out

    def _has(self, name: str) -> bool:
        return any(_key(k) == name for k in self._owner.zone)

    def _answer(self, qname: bytes, qtype: int) -> tuple[list, list, list]:
        answers: list[dns.RRHeader] = []
        name = _key(qname)
        owner_name = qname
        for _ in range(8):  # follow in-zone CNAME chains, but not forever
            if not self._has(name):
                if answers:
                    break
                raise error.AuthoritativeDomainError(qname)
            records = self._records(name)
            matching = [r for t, r in records if qtype in (t, dns.ALL_RECORDS)]
            cnames = [r for t, r in records if t == dns.CNAME]
            if matching or not cnames or qtype == dns.CNAME:
                answers.extend(
                    dns.RRHeader(owner_name, r.TYPE, dns.IN, r.ttl, r, auth=True)
                    for r in matching
                )
                break
            target = cnames[0]
            answers.append(
                dns.RRHeader(owner_name, dns.CNAME, dns.IN, target.ttl, target, auth=True)
            )
            owner_name = target.name.name
            name = _key(owner_name)
        return answers, [], []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred:
        key = _key(name)
        self.queries.append((key, dns.QUERY_TYPES.get(type, str(type))))
        owner = self._owner
        if key in owner.hang:
            pending: defer.Deferred = defer.Deferred()
            owner._hanging.append(pending)
            return pending
        try:
            if key in owner.servfail:
                raise _ServFail(key)
            if key in owner.refused:
                raise _Refused(key)
            result = self._answer(name, type)
        except Exception:
            return defer.fail()
        delay = owner.delay.get(key)
        if delay:
            return task.deferLater(owner.reactor, delay, lambda: result)
        return defer.succeed(result)


class _Factory(server.DNSServerFactory):
    """DNSServerFactory mapping our marker exceptions to rcodes, quietly,
    and truncating big UDP answers the way real servers do.

    The stock factory treats every non-DomainError as SERVFAIL *and* logs it
    as an unhandled error; deliberate test failures should not look like bugs.
    It also sends UDP answers of any size, so clients' TCP fallback (needed
    for long TXT/DKIM records in production) would never be exercised.
    """

    #: Largest UDP answer sent; bigger ones go out empty with TC set. 0: off.
    udp_limit = 512

    def sendReply(self, protocol: Any, message: Any, address: Any) -> None:
        if address is not None and self.udp_limit:
            message.maxSize = 0
            if len(message.toStr()) > self.udp_limit:
                message.answers, message.authority, message.additional = [], [], []
                message.trunc = 1
        server.DNSServerFactory.sendReply(self, protocol, message, address)

    def gotResolverError(self, failure: Failure, protocol: Any, message: Any, address: Any) -> None:
        if failure.check(_ServFail):
            rcode = dns.ESERVER
        elif failure.check(_Refused):
            rcode = dns.EREFUSED
        else:
            return server.DNSServerFactory.gotResolverError(
                self, failure, protocol, message, address
            )
        response = self._responseFromMessage(message=message, rCode=rcode)
        self.sendReply(protocol, response, address)
        return None


class DNSTestServer:
    """A loopback DNS server; see the module docstring for the zone format."""

    def __init__(
        self,
        zone: Zone | None = None,
        servfail: Iterable[str] = (),
        hang: Iterable[str] = (),
        refused: Iterable[str] = (),
        delay: Mapping[str, float] | None = None,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.zone: dict[str, list[RecordSpec]] = {
            _key(k): list(v) for k, v in (zone or {}).items()
        }
        self.servfail: set[str] = {_key(n) for n in servfail}
        self.hang: set[str] = {_key(n) for n in hang}
        self.refused: set[str] = {_key(n) for n in refused}
        self.delay: dict[str, float] = {_key(k): v for k, v in (delay or {}).items()}
        self.authority = ZoneAuthority(self)
        self._hanging: list[defer.Deferred] = []
        self._ports: list[IListeningPort] = []
        self.host = "127.0.0.1"
        self.port = 0
        #: UDP answers above this size are sent truncated (TC bit); 0 disables.
        self.udp_limit = 512

    # -- zone editing -------------------------------------------------------

    def add(self, name: str, rtype: str, value: Any, ttl: int = DEFAULT_TTL) -> None:
        """Add one record (validated immediately, so typos fail loudly)."""
        make_record(rtype, value, ttl)
        self.zone.setdefault(_key(name), []).append((rtype, value, ttl))

    def remove(self, name: str) -> None:
        """Forget every record of ``name`` (it then answers NXDOMAIN)."""
        self.zone.pop(_key(name), None)

    # -- introspection ------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` to hand to a resolver."""
        return (self.host, self.port)

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every query received so far, as ``(name, TYPE)``."""
        return self.authority.queries

    def count(self, name: str | None = None, rtype: str | None = None) -> int:
        """How many queries matched ``name`` and/or ``rtype`` (None = any)."""
        return sum(
            1
            for qname, qtype in self.queries
            if (name is None or qname == _key(name))
            and (rtype is None or qtype == rtype.upper())
        )

    # -- lifecycle ----------------------------------------------------------

    def start(self, host: str = "127.0.0.1") -> tuple[str, int]:
        """Listen on UDP and TCP, on one free port of ``host``."""
        factory = _Factory(authorities=[self.authority])
        factory.noisy = False
        factory.udp_limit = self.udp_limit
        last_error: Exception | None = None
        for _ in range(20):
            udp_proto = dns.DNSDatagramProtocol(controller=factory, reactor=self.reactor)
            udp = self.reactor.listenUDP(0, udp_proto, interface=host)
            port = udp.getHost().port
            try:
                tcp = self.reactor.listenTCP(port, factory, interface=host)
            except ierror.CannotListenError as exc:  # TCP twin taken: try again
                last_error = exc
                udp.stopListening()
                continue
            self._ports = [udp, tcp]
            self.host, self.port = host, port
            return self.address
        raise RuntimeError(f"could not bind UDP+TCP on one port: {last_error}")

    def stop(self) -> defer.Deferred:
        """Stop listening; the Deferred fires once both sockets are closed."""
        ports, self._ports = self._ports, []
        self._hanging.clear()
        return defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in ports], consumeErrors=True
        )


def start_dns_server(
    zone: Zone | None = None,
    servfail: Iterable[str] = (),
    hang: Iterable[str] = (),
    refused: Iterable[str] = (),
    delay: Mapping[str, float] | None = None,
    host: str = "127.0.0.1",
) -> DNSTestServer:
    """Start a :class:`DNSTestServer`; ``.address`` gives ``(host, port)``.

    Typical pytest-twisted fixture::

        @pytest_twisted.async_yield_fixture
        async def dns_server():
            srv = start_dns_server(ZONE, servfail={"sf.test"})
            yield srv
            await srv.stop()
    """
    srv = DNSTestServer(zone, servfail=servfail, hang=hang, refused=refused, delay=delay)
    srv.start(host)
    return srv
