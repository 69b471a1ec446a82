"""The ``karma`` plugin's history in Redis, so that a client's score follows it to every node.

With SQLite each server judges a client by what it did *there*; a spammer spreading its
sessions over the MX hosts of a domain starts clean on each. In Redis, one hash per
address (``qpconn:karma:<ip>``, fields ``good``, ``bad``, ``connections``, ``last_seen``,
``last_bad``) is shared by every node using the same URL. A session's points are added in
one ``MULTI`` transaction of ``HINCRBY``/``HSET``, so two nodes adding at once both count;
the key expires ``expire_days`` after the address was last scored, so Redis forgets
clients that went away without any clean-up job. Times are the scoring server's clock, as
with the SQLite file. The methods block: call them from the ``karma`` worker pool.
"""

from __future__ import annotations

from qpconn.kit.redisstate import REDIS_ERRORS, redis_client, redis_location

__all__ = ["RedisKarmaStore", "KEY_PREFIX"]

#: every key the store writes starts with this
KEY_PREFIX = "qpconn:karma:"


class RedisKarmaStore:
    """good, bad and the last bad point of each address, in Redis (blocking)."""

    errors: tuple[type[BaseException], ...] = REDIS_ERRORS

    def __init__(self, url: str, timeout: float, expire: float) -> None:
        self.client = redis_client(url, timeout)
        self.expire_ms = max(1, int(expire * 1000))
        #: where the history is, for the log (without any password of the URL)
        self.path = redis_location(self.client)

    def close(self) -> None:
        """Disconnect the client's pooled connections (the plugin is being detached)."""
        self.client.close()

    def read(self, ip: str) -> tuple[int, int, float | None]:
        """(good, bad, time of the last bad point) of ``ip``; zeros when unknown."""
        good, bad, last_bad = self.client.hmget(KEY_PREFIX + ip, ["good", "bad", "last_bad"])
        return int(good or 0), int(bad or 0), float(last_bad) if last_bad else None

    def add(self, ip: str, good: int, bad: int, now: float) -> None:
        """Add one session's points to ``ip``'s history, atomically."""
        key = KEY_PREFIX + ip
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(key, "good", good)
        pipe.hincrby(key, "bad", bad)
        pipe.hincrby(key, "connections", 1)
        pipe.hset(key, "last_seen", repr(now))
        if bad:
            pipe.hset(key, "last_bad", repr(now))
        pipe.pexpire(key, self.expire_ms)
        pipe.execute()
