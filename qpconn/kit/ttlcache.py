"""A bounded cache whose entries expire: answers worth remembering for a while, not forever.

Used by ``rcpt_verify`` for the next hop's verdict on each recipient: a positive one may
be kept long (mailboxes seldom disappear), a negative one shorter (a mailbox created a
minute ago must soon be reachable). The bound matters as much as the expiry: recipients
are chosen by the client, so a spammer's dictionary attack must not grow the process
without limit. When full, the entry used least recently goes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["TTLCache"]

V = TypeVar("V")


class TTLCache(Generic[V]):
    """At most ``size`` entries, each kept ``ttl`` seconds of ``clock`` (from ``put``)."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        if size < 0:
            raise ValueError("a cache size cannot be negative")
        self.size = size
        self.clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        """The value, if present and not expired (an expired one is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self.clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V, ttl: float) -> None:
        """Remember ``value`` for ``ttl`` seconds; ``ttl <= 0`` or size 0 keeps nothing."""
        self._entries.pop(key, None)
        if ttl <= 0 or self.size == 0:
            return
        self._entries[key] = (self.clock() + ttl, value)
        while len(self._entries) > self.size:  # bounded: one over at most
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
