"""The counters of the ``limit`` plugin: in this process, or in Redis for every node.

Two kinds of counter, the same in both stores:

* *occupancy* (sessions open at once from one address): :meth:`occupy` adds a member
  (the session) to a set when the set holds fewer than ``maximum``, :meth:`vacate`
  removes it, :meth:`refresh` keeps it counted. In Redis each member carries a deadline
  (``ttl`` seconds after it was added or last refreshed) and members past it are dropped
  before counting, so the sessions of a node that died without vacating stop counting by
  themselves instead of locking their address out for good.
* *rates* (events per period): :meth:`take` looks at several counters at once (the
  recipients of one address, of one sender, of one sender domain) and counts the event
  in every one of them only if none is full; it returns the index of the first full one
  otherwise. An event refused is not counted, so a client that is refused gets in again
  as soon as its window is over. A window starts with its counter's first event and
  lasts ``period`` seconds (a fixed window, like the server's own ``max_connection_rate``);
  in Redis the counter is a key that expires with its window.

Every Redis update is one Lua script, so two nodes counting at once cannot both take the
last place; times in Redis are Redis's own (``TIME``), so the nodes' clocks need not
agree. The Redis store's methods block: call them from a worker thread. The memory store
is called directly, with the server's clock.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from qpconn.kit.redisstate import REDIS_ERRORS, redis_client, redis_location

__all__ = ["Rate", "MemoryLimits", "RedisLimits", "KEY_PREFIX"]

#: every key the Redis store writes starts with this
KEY_PREFIX = "qpconn:limit:"

_RATE = re.compile(r"(\d+)/(\d+(?:\.\d+)?)([smhd]?)\Z")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

#: counters the memory store remembers at most; beyond, the oldest are forgotten early
#: (which lets a client in sooner, never later)
TABLE_SIZE = 100_000


@dataclass(frozen=True)
class Rate:
    """``count`` events per ``period`` seconds, written ``30/1m``, ``500/1h``, ``5/90``."""

    count: int
    period: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        match = _RATE.match(text.strip())
        if match is None:
            raise ValueError(f"a rate is COUNT/PERIOD (30/1m, 500/1h, 5/90), not {text!r}")
        count, period = int(match.group(1)), float(match.group(2)) * _UNITS[match.group(3)]
        if count < 1 or period <= 0 or period > 7 * 86400:
            raise ValueError(f"rate {text!r}: COUNT must be 1 or more, PERIOD up to 7d")
        return cls(count, period)

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


class MemoryLimits:
    """The counters of one server process (``limit`` without ``redis``)."""

    errors: tuple[type[BaseException], ...] = ()
    path = "memory"

    def __init__(self) -> None:
        self._sets: dict[str, set[str]] = {}
        #: key -> [events, end of window], oldest window first
        self._rates: OrderedDict[str, list[float]] = OrderedDict()

    def occupy(self, key: str, member: str, maximum: int, ttl: float, now: float) -> int:
        """Add ``member``; the count with it, or ``-count`` (refused) when full."""
        members = self._sets.setdefault(key, set())
        if len(members) >= maximum:
            return -len(members)
        members.add(member)
        return len(members)

    def refresh(self, key: str, member: str, ttl: float, now: float) -> None:
        """Nothing to do: a session of this process always vacates."""

    def vacate(self, key: str, member: str) -> None:
        members = self._sets.get(key)
        if members is not None:
            members.discard(member)
            if not members:
                del self._sets[key]

    def take(self, counters: Sequence[tuple[str, Rate]], now: float) -> int | None:
        """Count one event in each counter, or return the index of the first full one."""
        rates = self._rates
        while rates:  # forget the windows that are over, oldest first (bounded by the table)
            first = next(iter(rates.values()))
            if first[1] > now and len(rates) < TABLE_SIZE:
                break
            rates.popitem(last=False)
        entries = []
        for index, (key, rate) in enumerate(counters):
            entry = rates.get(key)
            if entry is not None and entry[1] <= now:
                del rates[key]
                entry = None
            if entry is not None and entry[0] >= rate.count:
                return index
            entries.append((key, rate, entry))
        for key, rate, entry in entries:
            if entry is None:
                rates[key] = [1, now + rate.period]
            else:
                entry[0] += 1
        return None

    def used(self, key: str) -> int:
        """How many events (or members) ``key`` holds now: for tests and logs."""
        entry = self._rates.get(key)
        return int(entry[0]) if entry is not None else len(self._sets.get(key, ()))


# KEYS[1] the address's sorted set; ARGV member, maximum, ttl (ms). Returns the count
# with the member added, or minus the count when full.
_OCCUPY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key, ttl = KEYS[1], tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local count = redis.call('ZCARD', key)
if count >= tonumber(ARGV[2]) then return -count end
redis.call('ZADD', key, now + ttl, ARGV[1])
redis.call('PEXPIRE', key, ttl)
return count + 1
"""

# KEYS[1] the set; ARGV member, ttl (ms): push the member's deadline on, if it is there.
_REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[1]) == 1 then
    redis.call('PEXPIRE', KEYS[1], ttl)
end
return 0
"""

# KEYS the counters; ARGV count_1, period_ms_1, count_2, period_ms_2, ... Returns the
# 1-based index of the first full counter, or 0 after counting the event in all of them.
_TAKE = """
for i, key in ipairs(KEYS) do
    local used = tonumber(redis.call('GET', key) or '0')
    if used >= tonumber(ARGV[2 * i - 1]) then return i end
end
for i, key in ipairs(KEYS) do
    if redis.call('INCR', key) == 1 or redis.call('PTTL', key) < 0 then
        redis.call('PEXPIRE', key, ARGV[2 * i])
    end
end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisLimits:
    """The counters in Redis, shared by every node that uses the same URL (blocking)."""

    errors: tuple[type[BaseException], ...] = REDIS_ERRORS

    def __init__(self, url: str, timeout: float) -> None:
        self.client = redis_client(url, timeout)
        self._occupy = self.client.register_script(_OCCUPY)
        self._refresh = self.client.register_script(_REFRESH)
        self._take = self.client.register_script(_TAKE)
        #: where the counters are, for the log (without any password of the URL)
        self.path = redis_location(self.client)

    def close(self) -> None:
        """Disconnect the client's pooled connections (the plugin is being detached)."""
        self.client.close()

    def occupy(self, key: str, member: str, maximum: int, ttl: float, now: float) -> int:
        return int(self._occupy(keys=[KEY_PREFIX + key], args=[member, maximum, _ms(ttl)]))

    def refresh(self, key: str, member: str, ttl: float, now: float) -> None:
        self._refresh(keys=[KEY_PREFIX + key], args=[member, _ms(ttl)])

    def vacate(self, key: str, member: str) -> None:
        self.client.zrem(KEY_PREFIX + key, member)

    def take(self, counters: Sequence[tuple[str, Rate]], now: float) -> int | None:
        keys = [KEY_PREFIX + key for key, _ in counters]
        args: list[int] = []
        for _, rate in counters:
            args += [rate.count, _ms(rate.period)]
        full = int(self._take(keys=keys, args=args))
        return full - 1 if full else None

    def used(self, key: str) -> int:
        full = KEY_PREFIX + key
        if self.client.type(full) == "zset":
            return int(self.client.zcard(full))
        return int(self.client.get(full) or 0)
