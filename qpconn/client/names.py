"""Host names of next hops resolved through the server's own DNS resolver.

``--dns-server`` promises that every DNS query the server makes goes to the servers it
names (a split-horizon resolver, a test's own server). Twisted's ``HostnameEndpoint``
and ``Agent`` ask the reactor's resolver instead, which is the system's ``getaddrinfo``.
:func:`resolving_reactor` gives them a view of the reactor whose ``nameResolver`` asks
an :class:`~twisted.internet.interfaces.IResolver` (``twisted.names``) for A and AAAA
records; everything else (timers, connecting) is the real reactor's, so the endpoint's
happy-eyeballs connection attempts work as they always do.

Without ``--dns-server`` the forwarding clients keep the system's resolver, which also
reads ``/etc/hosts``: what an administrator naming a next hop ``mailhub`` expects.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.names import dns
from zope.interface import alsoProvides, implementer, providedBy

__all__ = ["DNSHostnames", "resolving_reactor"]


@implementer(IHostResolution)
class _Resolution:
    """One name being resolved; cancelling stops the answers from being delivered."""

    def __init__(self, name: str, lookups: defer.Deferred[Any]) -> None:
        self.name = name
        self._lookups = lookups

    def cancel(self) -> None:
        self._lookups.cancel()


@implementer(IHostnameResolver)
class DNSHostnames:
    """``IHostnameResolver`` over an ``IResolver``: A and AAAA records, IPv6 ones first
    only when the resolver gives no IPv4 address (Happy Eyeballs still tries both)."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[Any]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        kinds = addressTypes or (IPv4Address, IPv6Address)
        lookups = defer.Deferred.fromCoroutine(self._addresses(hostName, kinds))
        resolution = _Resolution(hostName, lookups)
        resolutionReceiver.resolutionBegan(resolution)

        def deliver(addresses: list[tuple[type[Any], str]]) -> None:
            for kind, ip in addresses:
                resolutionReceiver.addressResolved(kind(transportSemantics, ip, portNumber))
            resolutionReceiver.resolutionComplete()

        def failed(_: Any) -> None:  # no address: the endpoint reports a DNSLookupError
            resolutionReceiver.resolutionComplete()

        lookups.addCallbacks(deliver, failed)
        return resolution

    async def _addresses(
        self, name: str, kinds: Sequence[type[Any]]
    ) -> list[tuple[type[Any], str]]:
        try:
            literal = ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            kind = IPv6Address if literal.version == 6 else IPv4Address
            return [(kind, str(literal))] if kind in kinds else []
        asked = []
        if IPv4Address in kinds:
            asked.append((IPv4Address, dns.A, self.resolver.lookupAddress(name)))
        if IPv6Address in kinds:
            asked.append((IPv6Address, dns.AAAA, self.resolver.lookupIPV6Address(name)))
        found: list[tuple[type[Any], str]] = []
        for kind, rtype, lookup in asked:
            try:
                answers, _, _ = await lookup
            except Exception:  # NXDOMAIN, SERVFAIL, timeout: no address of this kind
                continue
            for record in answers:
                if record.type == rtype:
                    found.append((kind, record.payload.dottedQuad() if rtype == dns.A
                                  else _ipv6(record.payload.address)))  # fmt: skip
        return found


def _ipv6(packed: bytes) -> str:
    return str(ipaddress.IPv6Address(packed))


class _ResolvingReactor:
    """The reactor, except that host names go to a DNSHostnames (see the module doc)."""

    def __init__(self, reactor: Any, resolver: Any) -> None:
        self._reactor = reactor
        self.nameResolver = DNSHostnames(resolver)

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def resolving_reactor(reactor: Any, resolver: Any | None) -> Any:
    """``reactor`` as ``HostnameEndpoint`` and ``Agent`` should see it: with ``resolver``
    (an ``IResolver``) answering their host names; ``reactor`` itself when it is None."""
    if resolver is None:
        return reactor
    view = _ResolvingReactor(reactor, resolver)
    # The real reactor's interfaces (IReactorTCP, IReactorTime...) and the pluggable
    # name resolver, so that the endpoint asks view.nameResolver.
    alsoProvides(view, *providedBy(reactor), IReactorPluggableNameResolver)
    return view
