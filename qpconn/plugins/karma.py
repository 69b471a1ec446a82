"""karma: remember how each client address behaved, and keep out the ones that behave badly.

Every session scores its client: each refusal it earns (any plugin's DENY/DENYSOFT, or a
``DONE`` with a 4xx/5xx reply) is one *bad* point, each message accepted for delivery one
*good* point. At disconnect the points are added to the address's history in a small
SQLite file. When a client connects, its karma is good minus bad; at ``-negative`` or
below (default 3), and with its last bad point less than ``penalty_days`` old (default
1), the client is *naughty*: refused with ``450 4.7.1`` before the greeting (temporary,
because karma recovers), or marked for the ``naughty`` plugin (``reject naughty``), or
only recorded (``reject 0``). Karma's own refusals do not count, or a client retrying
from the penalty box would never leave it. Relay clients are neither judged nor scored.

The database (``db PATH``, else the setting ``karma_db``, else ``./karma.db``) holds one
row per address (good, bad, connections, last seen, last bad). It is read once per
connection and written once per connection that scored, each time in the bounded ``karma``
worker pool (:mod:`qpconn.kit.threads`) with a fresh SQLite connection, so several server
processes may share it. Time (the age of the last bad point) is the server's clock
(``self.server.clock``: the reactor, or the fake clock of :mod:`qpconn.testing`).
If the file cannot be used the plugin logs a warning and judges nobody.

With ``redis URL`` the history lives in Redis instead (:mod:`qpconn.kit.karmaredis`), shared
by every server that uses the URL, so a client's bad points follow it to every node behind
an MX name; keys expire ``expire_days`` (default 60) after the address was last scored.
A Redis that cannot be used means the same as a bad file (nobody judged, nothing scored),
logged once per outage (:class:`qpconn.kit.redisstate.RedisOutage`); Redis is left alone
for a few seconds after a failure and used again, reconnected, when it answers.

Refusals by the plugins named in ``ignore`` (comma-separated, default ``greylisting``) do
not count either: a deferral every new sender gets says nothing bad about it, and
counting one per greylisted recipient would keep out the very retry greylisting asks for.

Arguments: ``db PATH``, ``redis URL``, ``redis_timeout N``, ``expire_days N``,
``negative N``, ``penalty_days N``, ``reject 1|0|naughty``, ``ignore NAME,...``.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from typing import Any

from qpconn.hooks.results import DONE, OK
from qpconn.hooks.verdicts import RejectPolicy, naughty_mark, record
from qpconn.kit.karmaredis import RedisKarmaStore
from qpconn.kit.policy import parse_options
from qpconn.kit.redisstate import RedisOutage
from qpconn.kit.threads import run_in_pool
from qpconn.plugins import Plugin

NOTE = "karma"
DAY = 86400.0
_SCHEMA = """CREATE TABLE IF NOT EXISTS karma (
    ip TEXT PRIMARY KEY, good INTEGER NOT NULL, bad INTEGER NOT NULL,
    connections INTEGER NOT NULL, last_seen REAL NOT NULL, last_bad REAL)"""
_UPSERT = """INSERT INTO karma (ip, good, bad, connections, last_seen, last_bad)
    VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT(ip) DO UPDATE SET
    good = good + excluded.good, bad = bad + excluded.bad, connections = connections + 1,
    last_seen = excluded.last_seen, last_bad = COALESCE(excluded.last_bad, last_bad)"""


class _Unavailable(Exception):
    """The history could not be read or written (already logged)."""


class KarmaStore:
    """The SQLite file; every method blocks, so call them from a thread."""

    #: what the methods raise when the file cannot be used
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, path: str) -> None:
        self.path = path

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5.0)
        db.execute(_SCHEMA)
        return db

    def read(self, ip: str) -> tuple[int, int, float | None]:
        """(good, bad, time of the last bad point) of ``ip``; zeros when unknown."""
        with closing(self._open()) as db:
            row = db.execute("SELECT good, bad, last_bad FROM karma WHERE ip = ?", (ip,)).fetchone()
        return (int(row[0]), int(row[1]), row[2]) if row else (0, 0, None)

    def add(self, ip: str, good: int, bad: int, now: float) -> None:
        """Add one session's points to ``ip``'s history."""
        with closing(self._open()) as db, db:
            db.execute(_UPSERT, (ip, good, bad, now, now if bad else None))


class Karma(Plugin):
    """Scores sessions and refuses addresses with a bad history (see the module docstring)."""

    def register(self, *args: str) -> None:
        options = parse_options(
            self.name,
            args,
            {"db": "", "redis": "", "redis_timeout": "2", "expire_days": "60",
             "negative": "3", "penalty_days": "1", "reject": "1", "ignore": "greylisting"},
            {"reject": ("0", "1", "naughty")},
            numbers=["negative", "penalty_days", "redis_timeout", "expire_days"],
        )  # fmt: skip
        self.store: KarmaStore | RedisKarmaStore
        #: a Redis outage, logged once; None with the SQLite file (each failure is logged)
        self.outage: RedisOutage | None = None
        if options["redis"]:
            expire = float(options["expire_days"]) * DAY
            if expire <= 0:
                raise ValueError("expire_days must be positive")
            self.store = RedisKarmaStore(options["redis"], float(options["redis_timeout"]),
                                         expire)  # fmt: skip
            self.outage = RedisOutage(self.name, self.store.path, self.log,
                                      "judging nobody and scoring nothing")  # fmt: skip
        else:
            path = options["db"] or self.config.get("karma_db") or "./karma.db"
            self.store = KarmaStore(self.config.path(path))
        self.negative = float(options["negative"])
        self.penalty = float(options["penalty_days"]) * DAY
        self.policy = RejectPolicy(reject=options["reject"], reject_type="temp")
        self.ignore = frozenset(name for name in options["ignore"].split(",") if name)

    def detach(self) -> None:
        """Disconnect from Redis (after a reload replaced this plugin, at shutdown); the
        SQLite store holds nothing open between calls."""
        if isinstance(self.store, RedisKarmaStore):
            self.store.close()

    def _now(self) -> float:
        return float(self.server.clock.seconds())

    async def _use(self, what: str, function: Any, *args: Any) -> Any:
        """``function(*args)`` in the worker pool; a store that cannot be used is logged
        (a Redis outage once) and raises :class:`_Unavailable`."""
        outage = self.outage
        if outage is not None and outage.holding():
            raise _Unavailable("not asked: it failed less than a few seconds ago")
        try:
            result = await run_in_pool("karma", function, *args)
        except self.store.errors as exc:
            if outage is None:
                self.log.warn("karma: cannot {what} {path}: {error}", what=what,
                              path=self.store.path, error=exc)  # fmt: skip
            else:
                outage.failed(exc)
            raise _Unavailable(str(exc)) from exc
        if outage is not None:
            outage.answered()
        return result

    async def hook_connect(self, transaction: Any) -> Any:
        connection = transaction.connection
        ip = connection.remote_ip
        if ip is None or connection.relay_client:
            record(transaction, self.name, "skip", "relay client or no IP", stage="connect")
            return None
        try:
            good, bad, last_bad = await self._use("read", self.store.read, ip)
        except _Unavailable as exc:
            record(transaction, self.name, "temperror", f"database: {exc}", stage="connect")
            return None
        score = good - bad
        connection.notes[NOTE] = {"history": score, "good": 0, "bad": 0}
        recent = last_bad is not None and self._now() - last_bad < self.penalty
        if score > -self.negative or not recent:
            record(transaction, self.name, "pass", f"karma {score}", stage="connect")
            return None
        return self.policy.fail(
            transaction,
            self.name,
            "connect",
            f"4.7.1 Your address {ip} has a poor reputation here (karma {score}); try again later",
            reason=f"karma {score} ({good} good, {bad} bad)",
        )

    def hook_deny(
        self, transaction: Any, plugin: Any, hook: Any, result: Any, message: Any
    ) -> None:
        if plugin == self.name or plugin in self.ignore or self._own_mark(transaction, message):
            return
        self._score(transaction, "bad")

    def _own_mark(self, transaction: Any, message: Any) -> bool:
        """True for ``naughty`` giving karma's own deferred refusal (``reject naughty``)."""
        mark = naughty_mark(transaction) if transaction is not None else None
        return bool(mark) and mark.get("plugin") == self.name and message == mark.get("message")

    def hook_ok(self, transaction: Any, plugin: Any, hook: Any, result: Any, message: Any) -> None:
        refused = result is DONE and bool(message) and str(message)[:1] in ("4", "5")
        if refused:
            self._score(transaction, "bad")
        elif hook == "queue" and result in (OK, DONE):
            self._score(transaction, "good")

    def _score(self, transaction: Any, kind: str) -> None:
        scores = transaction.connection.notes.get(NOTE) if transaction is not None else None
        if scores is not None:
            scores[kind] += 1

    async def hook_disconnect(self, transaction: Any) -> None:
        connection = transaction.connection
        scores = connection.notes.get(NOTE)
        if not scores or connection.remote_ip is None or not (scores["good"] or scores["bad"]):
            return
        good, bad = scores["good"], scores["bad"]
        try:
            await self._use("write", self.store.add, connection.remote_ip, good, bad, self._now())
        except _Unavailable:
            pass  # logged; this session's points are lost, which errs on the client's side
