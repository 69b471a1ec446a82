"""Reverse DNS lookups against a real DNS server on loopback."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.names import client, dns

from qpconn.server.lookup import (
    LookupCache,
    PeerLookup,
    ReverseDNS,
    make_resolver,
    sanitize_hostname,
)
from tests.support.dnsserver import DNSTestServer, start_dns_server

#: the budget of the lookups that test a timeout
TIMEOUT = 0.6
#: the budget of every other lookup: an answer is never mistaken for a timeout, and a
#: timeout test ending in under half of the 5 s ``dns_timeout`` default was cut off by
#: its own TIMEOUT, not by the default
LONG_TIMEOUT = 30.0
DEFAULT_TIMEOUT = 5.0
#: each step of the 127.0.0.15 lookup is answered this late, and their budget together
STEP_DELAY, STEPS_BUDGET = 1.0, 1.6


def rev(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


ZONE: dict[str, list[tuple[Any, ...]]] = {
    rev("127.0.0.1"): [("PTR", "Good.Test.", 300)],
    "good.test": [("A", "127.0.0.1", 120), ("A", "127.0.0.200", 120)],
    rev("127.0.0.2"): [("PTR", "liar.test.", 300)],
    "liar.test": [("A", "127.9.9.9", 300)],
    rev("127.0.0.6"): [("PTR", b"evil\r\nX-Injected: yes.test.", 300)],
    rev("127.0.0.7"): [("PTR", "has space (x).test.", 300)],
    rev("127.0.0.8"): [
        ("PTR", "first.test.", 300),
        ("PTR", "second.test.", 300),
        ("PTR", "third.test.", 300),
    ],
    "first.test": [("A", "127.8.8.8", 300)],
    "second.test": [("A", "127.0.0.8", 300)],
    "third.test": [("A", "127.0.0.8", 300)],
    rev("127.0.0.9"): [("PTR", "slowfwd.test.", 300)],
    rev("127.0.0.10"): [("PTR", "ghost.test.", 300)],
    rev("127.0.0.11"): [("TXT", "no ptr here", 300)],
    rev("127.0.0.12"): [("PTR", b"bad\x00name.test.", 300), ("PTR", "fine.test.", 300)],
    "fine.test": [("A", "127.0.0.12", 300)],
    rev("127.0.0.13"): [("PTR", "v6only.test.", 300)],
    "v6only.test": [("AAAA", "::1", 300)],
    rev("127.0.0.14"): [("PTR", "cname.test.", 300)],
    "cname.test": [("CNAME", "real.test.", 300)],
    "real.test": [("A", "127.0.0.14", 30)],
    rev("::1"): [("PTR", "v6.test.", 300)],
    "v6.test": [("AAAA", "0:0::1", 300)],
    rev("127.0.0.15"): [("PTR", "delayedfwd.test.", 300)],
    "delayedfwd.test": [("A", "127.0.0.15", 300)],
}


@pytest_twisted.async_yield_fixture
async def dns_server() -> AsyncIterator[DNSTestServer]:
    srv = start_dns_server(
        ZONE,
        servfail={rev("127.0.0.4")},
        hang={rev("127.0.0.5"), "slowfwd.test"},
        delay={rev("127.0.0.15"): STEP_DELAY, "delayedfwd.test": STEP_DELAY},
    )
    yield srv
    await srv.stop()


def make_lookup(srv: DNSTestServer, cache: LookupCache | None = None, **kw: Any) -> PeerLookup:
    timeout = kw.pop("timeout", LONG_TIMEOUT)
    resolver = make_resolver([srv.address], timeout=timeout)
    return PeerLookup(resolver, reactor, timeout=timeout, cache=cache, **kw)


@pytest_twisted.ensureDeferred
async def test_confirmed_name(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("127.0.0.1")
    assert result == ReverseDNS("good.test", True, None)
    assert dns_server.count(rev("127.0.0.1"), "PTR") == 1
    assert dns_server.count("good.test", "A") == 1
    assert dns_server.count("good.test", "AAAA") == 0  # IPv4 peer: A only


@pytest_twisted.ensureDeferred
async def test_ipv4_mapped_ipv6_is_looked_up_as_ipv4(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("::ffff:127.0.0.1")
    assert result == ReverseDNS("good.test", True, None)


@pytest_twisted.ensureDeferred
async def test_name_that_does_not_confirm(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("127.0.0.2")
    assert result == ReverseDNS("liar.test", False, "mismatch")


@pytest_twisted.ensureDeferred
async def test_forward_nxdomain_keeps_name(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("127.0.0.10")
    assert result == ReverseDNS("ghost.test", False, "forward-nxdomain")


@pytest_twisted.ensureDeferred
async def test_forward_only_other_family(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("127.0.0.13")
    assert result == ReverseDNS("v6only.test", False, "forward-nodata")


@pytest_twisted.ensureDeferred
async def test_forward_through_cname(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("127.0.0.14")
    assert result == ReverseDNS("cname.test", True, None)


@pytest_twisted.ensureDeferred
async def test_nxdomain(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("127.0.0.3")
    assert result == ReverseDNS(None, False, "nxdomain")


@pytest_twisted.ensureDeferred
async def test_nodata(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("127.0.0.11")
    assert result == ReverseDNS(None, False, "nodata")


@pytest_twisted.ensureDeferred
async def test_servfail(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("127.0.0.4")
    assert result == ReverseDNS(None, False, "servfail")


@pytest_twisted.ensureDeferred
async def test_server_never_answers(dns_server: DNSTestServer) -> None:
    start = time.monotonic()
    result = await make_lookup(dns_server, timeout=TIMEOUT).reverse("127.0.0.5")
    elapsed = time.monotonic() - start
    assert result == ReverseDNS(None, False, "timeout")
    assert TIMEOUT - 0.05 <= elapsed < DEFAULT_TIMEOUT / 2


@pytest_twisted.ensureDeferred
async def test_forward_step_never_answers(dns_server: DNSTestServer) -> None:
    start = time.monotonic()
    result = await make_lookup(dns_server, timeout=TIMEOUT).reverse("127.0.0.9")
    assert time.monotonic() - start < DEFAULT_TIMEOUT / 2
    assert result == ReverseDNS("slowfwd.test", False, "forward-timeout")


@pytest_twisted.ensureDeferred
async def test_deadline_covers_both_steps(dns_server: DNSTestServer) -> None:
    # Each step alone fits the budget (1 s < 1.6 s: the first answer may come 0.6 s late);
    # together they cannot (2 s, each delay being a minimum).
    start = time.monotonic()
    result = await make_lookup(dns_server, timeout=STEPS_BUDGET).reverse("127.0.0.15")
    assert time.monotonic() - start < DEFAULT_TIMEOUT / 2
    assert result == ReverseDNS("delayedfwd.test", False, "forward-timeout")
    # ...and with enough time the same lookup succeeds.
    ok = await make_lookup(dns_server).reverse("127.0.0.15")
    assert ok == ReverseDNS("delayedfwd.test", True, None)


@pytest.mark.parametrize("ip", ["127.0.0.6", "127.0.0.7"])
@pytest_twisted.ensureDeferred
async def test_hostile_ptr_is_garbage(dns_server: DNSTestServer, ip: str) -> None:
    result = await make_lookup(dns_server).reverse(ip)
    assert result == ReverseDNS(None, False, "garbage")
    # Nothing derived from the hostile name was ever queried.
    assert [q for q in dns_server.queries if q[1] != "PTR"] == []


@pytest_twisted.ensureDeferred
async def test_hostile_ptr_skipped_when_a_good_one_exists(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("127.0.0.12")
    assert result == ReverseDNS("fine.test", True, None)


@pytest_twisted.ensureDeferred
async def test_several_ptrs_first_confirmed_wins(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("127.0.0.8")
    assert result == ReverseDNS("second.test", True, None)


@pytest_twisted.ensureDeferred
async def test_several_ptrs_none_confirmed_keeps_first(dns_server: DNSTestServer) -> None:
    dns_server.zone["second.test"] = [("A", "127.8.8.8", 300)]
    dns_server.zone["third.test"] = [("A", "127.8.8.8", 300)]
    result = await make_lookup(dns_server).reverse("127.0.0.8")
    assert result == ReverseDNS("first.test", False, "mismatch")


@pytest_twisted.ensureDeferred
async def test_ipv6_loopback(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("0:0:0:0:0:0:0:1")
    assert result == ReverseDNS("v6.test", True, None)
    assert dns_server.count(rev("::1"), "PTR") == 1
    assert dns_server.count("v6.test", "AAAA") == 1


@pytest_twisted.ensureDeferred
async def test_bad_ip_is_not_looked_up(dns_server: DNSTestServer) -> None:
    result = await make_lookup(dns_server).reverse("not-an-ip")
    assert result == ReverseDNS(None, False, "badip")
    assert dns_server.queries == []


@pytest_twisted.ensureDeferred
async def test_cache_hit_does_not_query(dns_server: DNSTestServer) -> None:
    lookup = make_lookup(dns_server, cache=LookupCache(reactor))
    first = await lookup.reverse("127.0.0.1")
    second = await lookup.reverse("127.0.0.1")
    assert first == second == ReverseDNS("good.test", True, None)
    assert dns_server.count(rev("127.0.0.1")) == 1
    assert dns_server.count("good.test") == 1


@pytest_twisted.ensureDeferred
async def test_failures_are_cached_too(dns_server: DNSTestServer) -> None:
    lookup = make_lookup(dns_server, cache=LookupCache(reactor))
    assert (await lookup.reverse("127.0.0.4")).error == "servfail"
    assert (await lookup.reverse("127.0.0.4")).error == "servfail"
    assert dns_server.count(rev("127.0.0.4")) == 1


@pytest_twisted.ensureDeferred
async def test_cache_uses_min_ttl_and_is_bounded(dns_server: DNSTestServer) -> None:
    clock = task.Clock()
    cache = LookupCache(clock, max_entries=2)
    lookup = make_lookup(dns_server, cache=cache)
    await lookup.reverse("127.0.0.14")  # CNAME 300, A 30, PTR 300 -> 30 s
    assert cache.get(("reverse", ipaddress.ip_address("127.0.0.14"))) is not None
    clock.advance(31)
    assert cache.get(("reverse", ipaddress.ip_address("127.0.0.14"))) is None
    for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        await lookup.reverse(ip)
    assert len(cache) == 2
    await lookup.reverse("127.0.0.1")  # evicted, so asked again
    assert dns_server.count(rev("127.0.0.1")) == 2


class CountingResolver:
    """Delegates to a real resolver, counting PTR lookups that reach it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.ptr_calls = 0

    def lookupPointer(self, name: str, timeout: Any = None) -> defer.Deferred:
        self.ptr_calls += 1
        return self.inner.lookupPointer(name, timeout=timeout)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


@pytest_twisted.ensureDeferred
async def test_concurrent_lookups_share_one_query(dns_server: DNSTestServer) -> None:
    resolver = CountingResolver(make_resolver([dns_server.address], LONG_TIMEOUT))
    lookup = PeerLookup(resolver, reactor, timeout=LONG_TIMEOUT)
    results = await defer.gatherResults([lookup.reverse("127.0.0.1") for _ in range(5)])
    assert results == [ReverseDNS("good.test", True, None)] * 5
    assert resolver.ptr_calls == 1
    assert dns_server.count(rev("127.0.0.1")) == 1
    # A caller that cancels does not disturb the others.
    first, second = lookup.reverse("127.0.0.2"), lookup.reverse("127.0.0.2")
    first.cancel()
    first.addErrback(lambda f: f.trap(defer.CancelledError))
    assert (await second).name == "liar.test"


class BrokenResolver:
    """An IResolver that fails in every way it can."""

    def lookupPointer(self, name: str, timeout: Any = None) -> defer.Deferred:
        if name.startswith("1."):
            raise RuntimeError("synchronous explosion")
        if name.startswith("2."):
            return defer.fail(ZeroDivisionError())
        return defer.Deferred()  # never fires


@pytest_twisted.ensureDeferred
async def test_never_errbacks_with_broken_resolver() -> None:
    lookup = PeerLookup(BrokenResolver(), reactor, timeout=0.2)
    assert await lookup.reverse("127.0.0.1") == ReverseDNS(None, False, "error")
    assert await lookup.reverse("127.0.0.2") == ReverseDNS(None, False, "error")
    assert await lookup.reverse("127.0.0.3") == ReverseDNS(None, False, "timeout")


def test_deadline_with_fake_clock() -> None:
    clock = task.Clock()
    lookup = PeerLookup(BrokenResolver(), clock, timeout=5.0)
    results: list[ReverseDNS] = []
    lookup.reverse("127.0.0.3").addCallback(results.append)
    clock.advance(4.9)
    assert results == []
    clock.advance(0.2)
    assert results == [ReverseDNS(None, False, "timeout")]
    assert lookup._inflight == {}


def test_make_resolver_explicit_servers() -> None:
    resolver = make_resolver([("127.0.0.1", 5353)], timeout=2.0)
    assert isinstance(resolver, client.Resolver)
    assert resolver.servers == [("127.0.0.1", 5353)]
    assert sum(resolver.timeout) == pytest.approx(2.0)


# -- LookupCache ----------------------------------------------------------


def test_cache_ttl_expiry() -> None:
    clock = task.Clock()
    cache = LookupCache(clock, negative_ttl=10, max_ttl=100)
    cache.put("pos", "value", ttl=50)
    cache.put("neg", "failure")  # negative_ttl
    cache.put("capped", "value", ttl=10_000)
    cache.put("zero", "value", ttl=0)
    assert cache.get("zero") is None
    clock.advance(9.9)
    assert cache.get("neg") == "failure"
    clock.advance(0.1)
    assert cache.get("neg") is None
    assert cache.get("pos") == "value"
    clock.advance(40)
    assert cache.get("pos") is None
    assert cache.get("capped") == "value"
    clock.advance(50)
    assert cache.get("capped") is None


def test_cache_bounded_lru() -> None:
    clock = task.Clock()
    cache = LookupCache(clock, max_entries=3)
    for key in "abc":
        cache.put(key, key.upper(), ttl=60)
    assert cache.get("a") == "A"  # a becomes most recently used
    cache.put("d", "D", ttl=60)
    assert len(cache) == 3
    assert cache.get("b") is None
    assert [cache.get(k) for k in "acd"] == ["A", "C", "D"]


def test_cache_purge_and_validation() -> None:
    clock = task.Clock()
    cache = LookupCache(clock)
    cache.put("a", 1, ttl=1)
    cache.put("b", 2, ttl=5)
    clock.advance(2)
    assert cache.purge() == 1
    assert len(cache) == 1
    with pytest.raises(ValueError):
        cache.put("c", None)
    with pytest.raises(ValueError):
        LookupCache(clock, max_entries=0)


# -- sanitize_hostname ----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Mail.Example.COM.", "mail.example.com"),
        (b"mx-1.example.org", "mx-1.example.org"),
        ("_srv.example", "_srv.example"),
        ("localhost", "localhost"),
        ("a" * 63 + ".test", "a" * 63 + ".test"),
        ("a" * 64 + ".test", None),
        (".".join(["abc"] * 63) + ".a", ".".join(["abc"] * 63) + ".a"),  # 253
        (".".join(["abc"] * 63) + ".ab", None),  # 254
        ("", None),
        (".", None),
        ("a..b", None),
        (".a", None),
        ("a.b..", None),
        ("evil\r\nX-Injected: yes.test", None),
        ("with space.test", None),
        ("paren(s).test", None),
        ("[127.0.0.1]", None),
        ("nul\x00.test", None),
        (b"caf\xc3\xa9.test", None),
        ("café.test", None),
        ("tab\t.test", None),
    ],
)
def test_sanitize_hostname(raw: bytes | str, expected: str | None) -> None:
    assert sanitize_hostname(raw) == expected


@pytest_twisted.ensureDeferred
async def test_dns_helper_serves_txt_mx_and_tcp(dns_server: DNSTestServer) -> None:
    """The helper is reused by DNSBL/SPF/DKIM tests; check its other types."""
    dns_server.add("txt.test", "TXT", "v=spf1 -all", 60)
    dns_server.add("long.test", "TXT", "k" * 600, 60)
    dns_server.add("mx.test", "MX", (10, "mail.test."), 60)
    resolver = client.Resolver(servers=[dns_server.address], timeout=(LONG_TIMEOUT,))
    try:
        txt, _, _ = await resolver.lookupText("txt.test")
        assert txt[0].payload.data == [b"v=spf1 -all"]
        assert txt[0].ttl == 60
        # 600 octets do not fit a 512-byte UDP answer: truncated, retried on TCP.
        long_txt, _, _ = await resolver.lookupText("long.test")
        assert b"".join(long_txt[0].payload.data) == b"k" * 600
        mx, _, _ = await resolver.lookupMailExchange("mx.test")
        assert (mx[0].payload.preference, mx[0].payload.name.name) == (10, b"mail.test")
        message = await resolver.queryTCP([dns.Query(b"txt.test", dns.TXT)])
        assert message.answers[0].payload.data == [b"v=spf1 -all"]
        assert dns_server.count("long.test", "TXT") == 2  # UDP, then TCP
    finally:
        for proto in list(resolver.connections):
            proto.transport.loseConnection()
