"""What the factory learns about a peer before the connect hook: rDNS, FCrDNS, ident.

Both lookups start together when the connection is built and are bounded by their own
timeouts, so the greeting waits at most ``max(dns_timeout, ident_timeout)``. They never
fail: a lookup that errs or times out leaves the field None and says why in a note.

With the system resolver, ``/etc/hosts`` answers first (as ``getnameinfo`` does with
``hosts: files dns``), and a loopback address is never asked of the network: RFC 6303
makes 127.in-addr.arpa and ::1's reverse zone locally served, so an upstream answer
could only be wrong or slow.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from qpconn.server.ident import ident_lookup
from qpconn.server.lookup import (
    LookupCache,
    PeerLookup,
    ReverseDNS,
    make_resolver,
    sanitize_hostname,
)

if TYPE_CHECKING:
    from qpconn.mail.connection import Connection

__all__ = ["LookupSettings", "PeerInfo", "HostsFile", "clear_shared_cache"]

log = Logger(namespace="qpconn.lookup")

#: One cache per (reactor, resolver configuration) for the whole process: every factory
#: (and worker listener) asking the same servers shares it, while answers from different
#: servers (a test's own DNS server, a second listener pointed elsewhere) never mix.
_SHARED_CACHE: dict[tuple[int, tuple[tuple[str, int], ...] | None], LookupCache] = {}


def clear_shared_cache() -> None:
    """Forget every cached lookup result of the process (tests; a resolver change)."""
    for cache in _SHARED_CACHE.values():
        cache.clear()  # factories already running keep (and share) their emptied cache
    _SHARED_CACHE.clear()


@dataclass
class LookupSettings:
    """Which peer lookups run, where they ask, and how long they may take."""

    rdns: bool = True
    #: explicit DNS servers (host, port); None means /etc/resolv.conf (plus /etc/hosts)
    dns_servers: list[tuple[str, int]] | None = None
    #: seconds; None takes config ``dns_timeout`` (default 5)
    dns_timeout: float | None = None
    ident: bool = False
    ident_port: int = 113
    #: seconds; None takes config ``ident_timeout`` (default 3)
    ident_timeout: float | None = None
    hosts_file: str = "/etc/hosts"
    extra: dict[str, Any] = field(default_factory=dict)


class HostsFile:
    """Reverse map of a hosts file, re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: float | None = None
        self._names: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}

    def name_for(self, ip: str) -> str | None:
        """The first name listed for ``ip`` (sanitised), or None."""
        self._refresh()
        try:
            return self._names.get(ipaddress.ip_address(ip))
        except ValueError:
            return None

    def _refresh(self) -> None:
        try:
            stamp = os.stat(self.path).st_mtime
        except OSError:
            self._names = {}
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        names: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                words = line.split("#", 1)[0].split()
                if len(words) < 2:
                    continue
                try:
                    address = ipaddress.ip_address(words[0].split("%", 1)[0])
                except ValueError:
                    continue
                name = sanitize_hostname(words[1])
                if name is not None:
                    names.setdefault(address, name)
        self._names = names


class PeerInfo:
    """Runs the configured lookups for new connections of one factory."""

    def __init__(
        self, settings: LookupSettings, reactor: IReactorTime, resolver: Any | None = None
    ) -> None:
        self.settings = settings
        #: a full reactor: ident needs connectTCP as well as the clock
        self.clock = reactor
        self.hosts = HostsFile(settings.hosts_file)
        self.reverse: PeerLookup | None = None
        #: ``observer(kind, seconds, outcome)`` after each lookup (``rdns``/``ident``;
        #: ``ok``, ``timeout``, ``none`` or the rdns error word), or None: for metrics
        self.observer: Callable[[str, float, str], None] | None = None
        if settings.rdns:
            timeout = settings.dns_timeout or 5.0
            if resolver is None:
                resolver = make_resolver(settings.dns_servers, timeout)
            servers = (
                tuple((host, int(port)) for host, port in settings.dns_servers)
                if settings.dns_servers is not None
                else None
            )
            key = (id(reactor), servers)
            cache = _SHARED_CACHE.get(key)
            if cache is None:
                cache = _SHARED_CACHE[key] = LookupCache(reactor)
            self.reverse = PeerLookup(resolver, reactor, timeout, cache)

    async def fill(self, connection: Connection) -> None:
        """Set remote_host, remote_host_verified and remote_info on ``connection``."""
        ip = connection.remote_ip
        if ip is None:
            return
        waits: list[defer.Deferred[Any]] = []
        if self.reverse is not None:
            waits.append(defer.ensureDeferred(self._reverse(connection, ip)))
        if self.settings.ident and connection.remote_port and connection.local_port:
            waits.append(defer.ensureDeferred(self._ident(connection, ip)))
        if waits:
            await defer.gatherResults(waits, consumeErrors=True)

    async def _reverse(self, connection: Connection, ip: str) -> None:
        assert self.reverse is not None
        started = self.clock.seconds()
        result: ReverseDNS
        if self.settings.dns_servers is None:
            name = self.hosts.name_for(ip)
            if name is not None:
                result = ReverseDNS(name, True, None)
            elif ipaddress.ip_address(ip).is_loopback:
                result = ReverseDNS(None, False, "loopback")
            else:
                result = await self.reverse.reverse(ip)
        else:
            result = await self.reverse.reverse(ip)
        connection.remote_host = result.name
        connection.remote_host_verified = result.verified
        if result.error:
            connection.notes["rdns_error"] = result.error
        if self.observer is not None:
            self.observer("rdns", self.clock.seconds() - started, result.error or "ok")
        log.debug(
            "{conn_id} rdns {ip} -> {name} verified={verified} error={error}",
            conn_id=connection.id,
            ip=ip,
            name=result.name,
            verified=result.verified,
            error=result.error,
        )

    async def _ident(self, connection: Connection, ip: str) -> None:
        assert connection.remote_port is not None and connection.local_port is not None
        started = self.clock.seconds()
        timeout = self.settings.ident_timeout or 3.0
        user = await ident_lookup(
            self.clock,
            ip,
            connection.remote_port,
            connection.local_ip or "",
            connection.local_port,
            port=self.settings.ident_port,
            timeout=timeout,
        )
        connection.remote_info = user
        if self.observer is not None:
            elapsed = self.clock.seconds() - started
            # ident_lookup answers None for every failure; only the clock tells a timeout
            outcome = "ok" if user else ("timeout" if elapsed >= timeout else "none")
            self.observer("ident", elapsed, outcome)
