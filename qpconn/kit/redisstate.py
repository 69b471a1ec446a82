"""What plugins that keep shared state in Redis (``limit``, ``karma``) have in common.

The client: redis-py's synchronous client, called from a bounded worker pool
(:func:`qpconn.kit.threads.run_in_pool`), for the reasons :mod:`qpconn.kit.greyredis`
gives (``redis.asyncio`` needs an asyncio loop the default reactor does not run; a RESP
client of our own would redo URLs, passwords, TLS, unix sockets and reconnection). Every
call carries a socket timeout and is retried once, without delay, on a broken connection:
a Redis that restarted is reconnected by the retry or by the next call, with no action
from us, and one that is down or hangs costs at most twice the timeout.

The outage: a Redis that stopped answering is one event, not one per session. The
plugin reports each failure to :class:`RedisOutage`, which logs the first at ``warn``
with ``event="redis_outage"`` (counted by ``qpconn_redis_outages_total``), holds Redis
off for ``hold`` seconds (calls in that time are answered as failures at once, so a
hanging Redis does not make every session wait out the timeout in turn) and, when a
later call succeeds, logs once at ``info`` that it is back (``event="redis_recovered"``).
It is only used from the reactor thread: the workers just raise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["redis_client", "redis_location", "RedisOutage", "REDIS_ERRORS", "check_redis_url"]

#: what a call raises when Redis cannot be used (down, timed out, refused the password)
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError,)

_SCHEMES = ("redis://", "rediss://", "unix://")


def check_redis_url(url: str) -> None:
    """ValueError for what redis-py would not take, at load time rather than first use."""
    if not url.startswith(_SCHEMES):
        raise ValueError(f"redis URL must start with redis://, rediss:// or unix://, not {url!r}")


def redis_client(url: str, timeout: float) -> redis.Redis:
    """A client for ``url`` whose every call is bounded by ``timeout`` seconds."""
    check_redis_url(url)
    if timeout <= 0:
        raise ValueError("redis_timeout must be positive")
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        decode_responses=True,
    )


def redis_location(client: redis.Redis) -> str:
    """Where ``client`` goes, for the log: host and port (or socket) and database, never
    the password of the URL."""
    kwargs = client.connection_pool.connection_kwargs
    where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
    return f"redis {where} db {kwargs.get('db', 0)}"


class RedisOutage:
    """Whether Redis is usable now, and the one warning per outage (reactor thread only).

    ``policy`` ends the warning: what the plugin does while Redis is away ("letting mail
    through", "giving 451"), so that the log line says what the outage costs.
    """

    #: seconds Redis is not asked after a failure
    hold: float = 5.0

    def __init__(
        self,
        plugin: str,
        where: str,
        log: Any,
        policy: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plugin, self.where, self.log, self.policy = plugin, where, log, policy
        self.clock = clock
        #: when the current outage began (None: Redis answered last time)
        self.down_since: float | None = None
        self._failed_at = 0.0
        #: outages seen since start-up
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def holding(self) -> bool:
        """True while Redis failed less than ``hold`` seconds ago: do not ask it now."""
        return self.down_since is not None and self.clock() - self._failed_at < self.hold

    def failed(self, error: BaseException | str) -> None:
        """A call failed; the first failure of an outage is logged (warn), not the others."""
        now = self.clock()
        self._failed_at = now
        if self.down_since is not None:
            return
        self.down_since = now
        self.outages += 1
        self.log.warn(
            "{plugin}: cannot use {where}: {error}; {policy} until it answers again",
            plugin=self.plugin,
            where=self.where,
            error=str(error),
            policy=self.policy,
            event="redis_outage",
        )

    def answered(self) -> None:
        """A call succeeded: if Redis was down, say once that it is back."""
        if self.down_since is None:
            return
        seconds = self.clock() - self.down_since
        self.down_since = None
        self.log.info(
            "{plugin}: {where} answers again after {seconds:.1f}s",
            plugin=self.plugin,
            where=self.where,
            seconds=seconds,
            event="redis_recovered",
        )
