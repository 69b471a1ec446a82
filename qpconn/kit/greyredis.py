"""Greylisting triplets kept in Redis, so that several servers share one memory.

Servers behind one MX name that each keep their own SQLite file defer a new sender once
per server; sharing the triplets in Redis makes a retry count wherever it lands.

Why the synchronous ``redis`` client in the ``greylist`` worker pool rather than
``redis.asyncio`` or a RESP client written on Twisted: ``redis.asyncio`` needs an asyncio
loop, which the default Twisted reactor does not run; a home-made RESP client would have
to redo what redis-py already does well (URLs with passwords, TLS, databases, unix
sockets, reconnecting a pooled connection after Redis restarts). The pool is bounded and
every call carries a socket timeout, so a Redis that is down or hangs costs at most a few
worker threads for ``timeout`` seconds, never the reactor.

Each triplet is one hash, ``qpconn:greylist:<network> <sender> <recipient>``, with fields
``first``, ``last``, ``white`` and ``attempts``. The decision and the update happen in one
Lua script, so two servers seeing the same triplet at once cannot both think it new. The
key's time to live is what is left of its grey period (``grey_timeout`` after the first
attempt) or, once white, ``white_timeout`` from the last time it was seen: Redis forgets
triplets by itself, and no clean-up job is needed.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["RedisGreyStore", "KEY_PREFIX"]

#: every key the store writes starts with this
KEY_PREFIX = "qpconn:greylist:"

# KEYS[1] the triplet; ARGV now, black, grey, white (seconds, as decimal text).
# Returns one of the decisions of qpconn.plugins.greylisting (new, early, expired, ...).
_DECIDE = """
local key = KEYS[1]
local now, black, grey, white = tonumber(ARGV[1]), tonumber(ARGV[2]),
    tonumber(ARGV[3]), tonumber(ARGV[4])
local function keep(seconds)
    redis.call('PEXPIRE', key, math.max(1, math.ceil(seconds * 1000)))
end
local row = redis.call('HMGET', key, 'first', 'last', 'white')
local first, last, is_white = tonumber(row[1]), tonumber(row[2]), row[3] == '1'
if first == nil or last == nil then
    redis.call('HSET', key, 'first', ARGV[1], 'last', ARGV[1], 'white', '0', 'attempts', '1')
    keep(grey)
    return 'new'
end
if is_white and now - last <= white then
    redis.call('HSET', key, 'last', ARGV[1])
    keep(white)
    return 'white'
end
if is_white or now - first > grey then
    redis.call('HSET', key, 'first', ARGV[1], 'last', ARGV[1], 'white', '0', 'attempts', '1')
    keep(grey)
    return 'expired'
end
redis.call('HINCRBY', key, 'attempts', 1)
if now - first < black then
    redis.call('HSET', key, 'last', ARGV[1])
    keep(first + grey - now)
    return 'early'
end
redis.call('HSET', key, 'last', ARGV[1], 'white', '1')
keep(white)
return 'passed'
"""


class RedisGreyStore:
    """The triplets in Redis; ``check`` blocks (call it from a worker thread)."""

    #: what ``check`` raises when Redis cannot be used
    errors: tuple[type[BaseException], ...] = (redis.RedisError,)
    #: seconds Redis is not asked after a failure: while it hangs, recipients queued for
    #: the worker pool are let through at once instead of each waiting out the timeout
    hold: float = 5.0

    def __init__(self, url: str, black: float, grey: float, white: float,
                 timeout: float) -> None:  # fmt: skip
        # One retry without delay: a pooled connection that Redis closed (a restart) is
        # reconnected once, but a Redis that is down or hangs costs at most 2 x timeout.
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
        )
        self.script = self.client.register_script(_DECIDE)
        self.black, self.grey, self.white = black, grey, white
        kwargs = self.client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        #: where the triplets are, for the log (without any password of the URL)
        self.path = f"redis {where} db {kwargs.get('db', 0)}"
        self.failed_at: float | None = None

    def close(self) -> None:
        """Disconnect the client's pooled connections (the plugin is being detached)."""
        self.client.close()

    @staticmethod
    def key(triplet: tuple[str, str, str]) -> str:
        """The Redis key of ``(network, sender, recipient)``."""
        network, sender, recipient = triplet
        return f"{KEY_PREFIX}{network} <{sender}> <{recipient}>"

    def check(self, triplet: tuple[str, str, str], now: float) -> str:
        """Decide on ``triplet`` and record this attempt, atomically in Redis."""
        failed_at = self.failed_at
        if failed_at is not None and time.monotonic() - failed_at < self.hold:
            raise redis.ConnectionError(f"not asked: it failed less than {self.hold:g}s ago")
        args: list[Any] = [repr(now), repr(self.black), repr(self.grey), repr(self.white)]
        try:
            decision = str(self.script(keys=[self.key(triplet)], args=args))
        except (redis.ConnectionError, redis.TimeoutError):  # not for one bad key
            self.failed_at = time.monotonic()
            raise
        self.failed_at = None
        return decision
