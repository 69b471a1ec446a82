"""Asynchronous peer lookups: reverse DNS with forward confirmation, cached.

Every SMTP connection wants to know the peer's host name, and plugins want
to know whether that name is trustworthy.  A PTR record alone proves nothing
(the owner of an address block may write any name there), so the name is
only marked ``verified`` when its A/AAAA records point back at the peer
(forward-confirmed reverse DNS, FCrDNS).

The lookup is on the hot path of accepting a connection, so it is bounded in
time (a hard deadline across both steps), never errbacks (a broken resolver
must not break the SMTP session), rejects names that are unsafe to echo into
headers or logs, and is cached so a busy peer costs one lookup per TTL.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.names import client, dns
from twisted.names import error as dnserror

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: How many distinct PTR names get a forward lookup; more is just load.
MAX_PTR_NAMES = 8

_LABEL = re.compile(r"[a-z0-9_-]{1,63}\Z")


@dataclass(frozen=True)
class ReverseDNS:
    """Outcome of :meth:`PeerLookup.reverse`.

    ``error`` is a short word for logs and plugins.  PTR step: ``"badip"``,
    ``"nxdomain"``, ``"nodata"``, ``"servfail"``, ``"refused"``,
    ``"timeout"``, ``"garbage"`` (only unsafe names), ``"error"`` (anything
    else); ``name`` is then None.  Forward step (``name`` kept, ``verified``
    False): ``"mismatch"`` (addresses found, none is the peer) or
    ``"forward-"`` plus one of the words above, e.g. ``"forward-timeout"``.
    """

    name: str | None
    verified: bool
    error: str | None = None


def sanitize_hostname(name: bytes | str) -> str | None:
    """Return ``name`` lower-cased if it is a plain host name, else None.

    PTR data is attacker-controlled and ends up in Received headers, logs
    and plugin decisions, so only ``[A-Za-z0-9_.-]`` survives: anything else
    (CR/LF, spaces, NUL, parentheses, brackets, non-ASCII) could forge
    header lines or confuse parsers.
    """
    if isinstance(name, bytes):
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            return None
    elif isinstance(name, str):
        text = name
    else:
        return None
    if not text.isascii():
        return None
    text = text.lower()
    if text.endswith("."):
        text = text[:-1]
    if not text or len(text) > 253:
        return None
    if not all(_LABEL.match(label) for label in text.split(".")):
        return None
    return text


class LookupCache:
    """A bounded TTL cache (LRU eviction) keyed by anything hashable.

    Bounded because peers choose their addresses: an unbounded cache would
    let a botnet grow our memory.  The clock is injected so tests can drive
    expiry with :class:`twisted.internet.task.Clock`.  ``None`` is not a
    storable value (``get`` uses it to mean "miss").
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_entries: int = 10000,
        negative_ttl: float = 60.0,
        max_ttl: float = 3600.0,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self.max_entries = max_entries
        self.negative_ttl = negative_ttl
        self.max_ttl = max_ttl
        self._data: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        """Return the live value for ``key`` (marking it recently used)."""
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self._clock.seconds() >= expires:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (None: ``negative_ttl``).

        The TTL is capped at ``max_ttl``; a TTL of zero or less means "do
        not cache", as in DNS.
        """
        if value is None:
            raise ValueError("None cannot be cached")
        seconds = self.negative_ttl if ttl is None else min(float(ttl), self.max_ttl)
        if seconds <= 0:
            self._data.pop(key, None)
            return
        self._data[key] = (self._clock.seconds() + seconds, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def purge(self) -> int:
        """Drop expired entries now; return how many were dropped."""
        now = self._clock.seconds()
        dead = [k for k, (expires, _) in self._data.items() if now >= expires]
        for key in dead:
            del self._data[key]
        return len(dead)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        """Number of stored entries, expired ones included until touched."""
        return len(self._data)


def _normalize_ip(ip: str) -> IPAddress:
    """Parse ``ip``; IPv4-mapped IPv6 becomes IPv4 (that is what DNS has)."""
    addr = ipaddress.ip_address(ip.strip().strip("[]").split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _error_word(exc: BaseException) -> str:
    """Map resolver exceptions to the short words in :class:`ReverseDNS`."""
    table: Sequence[tuple[type[BaseException], str]] = (
        (dnserror.DNSNameError, "nxdomain"),
        (dnserror.DNSServerError, "servfail"),
        (dnserror.DNSQueryRefusedError, "refused"),
        (dnserror.DNSFormatError, "formerr"),
        (dnserror.DNSNotImplementedError, "notimp"),
        (defer.TimeoutError, "timeout"),  # DNSQueryTimeoutError too
        (TimeoutError, "timeout"),
        (dnserror.AuthoritativeDomainError, "nxdomain"),
        (dnserror.DomainError, "nxdomain"),
    )
    for cls, word in table:
        if isinstance(exc, cls):
            return word
    return "error"


def _attempts(remaining: float) -> tuple[float]:
    """Resolver timeout sequence for one step: a single, full-length attempt.

    ``twisted.names.client`` sends each retransmission from a fresh socket,
    so a reply to an earlier attempt is lost; splitting the budget would turn
    a slow-but-working server into a timeout.  We prefer waiting for it.
    """
    return (max(remaining, 0.01),)


def _min_ttl(records: Sequence[dns.RRHeader]) -> int:
    return min((int(rr.ttl) for rr in records), default=0)


class _Progress:
    """What a running lookup has learnt so far (used if the deadline hits)."""

    name: str | None = None


class PeerLookup:
    """Reverse-DNS lookups for connecting peers, bounded, shared and cached.

    ``resolver`` is any ``IResolver`` (see :func:`make_resolver`); ``clock``
    supplies deadlines and cache time.  Without a ``cache`` nothing is
    remembered, but concurrent lookups of one address are still merged.
    """

    def __init__(
        self,
        resolver: Any,
        clock: IReactorTime,
        timeout: float = 5.0,
        cache: LookupCache | None = None,
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self.timeout = timeout
        self.cache = cache
        self._inflight: dict[IPAddress, list[defer.Deferred[ReverseDNS]]] = {}

    def reverse(self, ip: str) -> defer.Deferred[ReverseDNS]:
        """Look up and forward-confirm the name of ``ip``; never errbacks."""
        try:
            addr = _normalize_ip(ip)
        except ValueError:
            return defer.succeed(ReverseDNS(None, False, "badip"))
        if self.cache is not None:
            cached = self.cache.get(("reverse", addr))
            if cached is not None:
                return defer.succeed(cached)

        waiters = self._inflight.get(addr)
        is_new = waiters is None
        if waiters is None:
            waiters = self._inflight[addr] = []

        def forget(d: defer.Deferred[ReverseDNS]) -> None:
            # A caller gave up (e.g. the client hung up); others keep waiting.
            if d in waiters:
                waiters.remove(d)

        result: defer.Deferred[ReverseDNS] = defer.Deferred(forget)
        waiters.append(result)
        if is_new:
            self._start(addr)
        return result

    def _start(self, addr: IPAddress) -> None:
        """Run one lookup for ``addr`` under a hard deadline."""
        progress = _Progress()
        finished = False

        def finish(outcome: ReverseDNS, ttl: float | None) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            if guard.active():
                guard.cancel()
            if self.cache is not None:
                self.cache.put(("reverse", addr), outcome, ttl)
            for waiter in self._inflight.pop(addr, []):
                waiter.callback(outcome)

        def on_deadline() -> None:
            if progress.name is None:
                finish(ReverseDNS(None, False, "timeout"), None)
            else:
                finish(ReverseDNS(progress.name, False, "forward-timeout"), None)
            work.cancel()  # release sockets and timers held by the resolver

        def on_crash(failure: Any) -> None:
            if not failure.check(defer.CancelledError):
                finish(ReverseDNS(progress.name, False, "error"), None)

        deadline = self._clock.seconds() + self.timeout
        guard = self._clock.callLater(self.timeout, on_deadline)
        work = defer.Deferred.fromCoroutine(self._resolve(addr, deadline, progress))
        work.addCallback(lambda pair: finish(*pair))
        work.addErrback(on_crash)

    async def _resolve(
        self, addr: IPAddress, deadline: float, progress: _Progress
    ) -> tuple[ReverseDNS, float | None]:
        """PTR, then A/AAAA of each name; returns (result, ttl or None)."""

        def remaining() -> tuple[float]:
            return _attempts(deadline - self._clock.seconds())

        try:
            answers, _, _ = await self._resolver.lookupPointer(
                addr.reverse_pointer, timeout=remaining()
            )
        except defer.CancelledError:
            raise
        except Exception as exc:
            return ReverseDNS(None, False, _error_word(exc)), None

        ptrs = [rr for rr in answers if rr.type == dns.PTR]
        if not ptrs:
            return ReverseDNS(None, False, "nodata"), None
        names: list[str] = []
        for rr in ptrs:
            name = sanitize_hostname(rr.payload.name.name)
            if name is not None and name not in names:
                names.append(name)
        if not names:
            return ReverseDNS(None, False, "garbage"), None
        names = names[:MAX_PTR_NAMES]
        progress.name = names[0]
        ptr_ttl = _min_ttl(answers)

        checks = [
            defer.Deferred.fromCoroutine(self._confirm(name, addr, remaining())) for name in names
        ]
        outcomes = await defer.gatherResults(checks, consumeErrors=True)
        for name, (ok, _, ttl) in zip(names, outcomes, strict=True):
            if ok:
                return ReverseDNS(name, True), min(ptr_ttl, ttl)
        ok, word, ttl = outcomes[0]
        if word != "mismatch":
            return ReverseDNS(names[0], False, word), None
        return ReverseDNS(names[0], False, word), min(ptr_ttl, ttl)

    async def _confirm(
        self, name: str, addr: IPAddress, timeout: tuple[float]
    ) -> tuple[bool, str, int]:
        """Does ``name`` resolve to ``addr``?  (ok, error word, ttl)."""
        lookup = (
            self._resolver.lookupAddress
            if isinstance(addr, ipaddress.IPv4Address)
            else self._resolver.lookupIPV6Address
        )
        try:
            answers, _, _ = await lookup(name, timeout=timeout)
        except defer.CancelledError:
            raise
        except Exception as exc:
            return False, "forward-" + _error_word(exc), 0
        found = False
        for rr in answers:
            if rr.type not in (dns.A, dns.AAAA):
                continue
            found = True
            try:
                other = _normalize_ip(str(ipaddress.ip_address(rr.payload.address)))
            except ValueError:
                continue
            if other == addr:
                return True, "", _min_ttl(answers)
        return False, ("mismatch" if found else "forward-nodata"), _min_ttl(answers)


def make_resolver(servers: list[tuple[str, int]] | None, timeout: float) -> Any:
    """Build the ``IResolver`` for :class:`PeerLookup` (and DNS plugins).

    With explicit ``servers`` exactly those are asked, and neither
    ``/etc/hosts`` nor ``resolv.conf`` is consulted, so tests see only their
    own server.  With None the system's ``/etc/resolv.conf`` is used (and
    re-read when it changes).  There is deliberately no caching resolver in
    front: :class:`LookupCache` caches whole results with their TTLs.
    """
    attempts = _attempts(timeout)
    if servers is not None:  # an empty list is a configuration error: ValueError
        return client.Resolver(servers=list(servers), timeout=attempts)
    return client.Resolver(resolv="/etc/resolv.conf", timeout=attempts)
