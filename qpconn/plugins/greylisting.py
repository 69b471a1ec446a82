"""greylisting: defer the first delivery attempt of an unknown (network, sender, recipient).

Real mail servers retry a 4xx; much spamware does not. Each recipient's *triplet* is the
client's network (the /24 of an IPv4 address, the /64 of an IPv6 one, so a sender's pool
of outgoing servers counts as one), the envelope sender and the recipient, compared
without regard to case. At ``RCPT``:

* an unknown triplet is recorded and deferred: ``450 4.7.1 Greylisted, try again later``;
* a retry sooner than ``black_timeout`` seconds after the first attempt (default 3000,
  50 minutes) is deferred again: a real queue does not retry that fast;
* a retry after that, but within ``grey_timeout`` (default 12000, 3 h 20 min), passes and
  whitelists the triplet; a retry later than that starts over as unknown;
* a whitelisted triplet passes, and stays white while it is seen at least every
  ``white_timeout`` seconds (default 3110400, 36 days).

Relay clients and authenticated users are not greylisted. ``mode testonly`` records what
would have happened (a verdict) without deferring anyone.

State lives in an SQLite file (``db PATH``, default ``./greylist.db``), embedded, read and
written in the bounded ``greylist`` worker pool so the reactor never waits on the disk;
several processes of one server may share it (SQLite locks the file). With
``redis URL`` the triplets live in Redis instead (:mod:`qpconn.kit.greyredis`), so that
several servers behind one name share them; Redis forgets them by itself (TTLs), and a
failed Redis is left alone for a few seconds before it is asked again. A
database or Redis that cannot be used lets mail through (logged as a warning, verdict
``temperror``): greylisting is a filter, not a gate, and deferring every sender while
the store is down would hold up all mail, good and bad alike.

Arguments: ``db PATH``, ``redis URL``, ``redis_timeout N``, ``black_timeout N``,
``grey_timeout N``, ``white_timeout N``, ``mode denysoft|testonly``.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from contextlib import closing
from typing import Any

from qpconn.hooks.results import DECLINED, DENYSOFT
from qpconn.hooks.verdicts import record
from qpconn.kit.greyredis import RedisGreyStore
from qpconn.kit.policy import parse_ip, parse_options
from qpconn.kit.threads import run_in_pool
from qpconn.mail.address import Address
from qpconn.plugins import Plugin

__all__ = ["Greylisting", "GreyStore", "triplet_network"]

_SCHEMA = """CREATE TABLE IF NOT EXISTS greylist (
    network TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, white INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (network, sender, recipient))"""

#: what GreyStore.check decides
NEW, EARLY, EXPIRED, PASSED, WHITE = "new", "early", "expired", "passed", "white"


def triplet_network(ip: str) -> str:
    """The network a triplet is kept for: /24 for IPv4, /64 for IPv6."""
    address = parse_ip(ip)
    if address is None:
        return ip
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class GreyStore:
    """The SQLite table of triplets; every method blocks (call it from a worker)."""

    #: what ``check`` raises when the file cannot be used
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, path: str, black: float, grey: float, white: float) -> None:
        self.path, self.black, self.grey, self.white = path, black, grey, white

    def check(self, key: tuple[str, str, str], now: float) -> str:
        """Look ``key`` up and record this attempt, in one write transaction."""
        with closing(sqlite3.connect(self.path, timeout=5.0, isolation_level=None)) as db:
            db.execute(_SCHEMA)
            db.execute("BEGIN IMMEDIATE")
            try:
                decision = self._decide(db, key, now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return decision

    def _decide(self, db: sqlite3.Connection, key: tuple[str, str, str], now: float) -> str:
        row = db.execute(
            "SELECT first_seen, last_seen, white FROM greylist"
            " WHERE network = ? AND sender = ? AND recipient = ?",
            key,
        ).fetchone()
        where = " WHERE network = ? AND sender = ? AND recipient = ?"
        if row is None:
            db.execute(
                "INSERT INTO greylist (network, sender, recipient, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?, ?)",
                (*key, now, now),
            )
            return NEW
        first, last, white = row
        if white and now - last <= self.white:
            db.execute("UPDATE greylist SET last_seen = ?" + where, (now, *key))
            return WHITE
        if white or now - first > self.grey:  # white but unseen too long, or grey too long
            db.execute(
                "UPDATE greylist SET first_seen = ?, last_seen = ?, white = 0, attempts = 1"
                + where,
                (now, now, *key),
            )
            return EXPIRED
        if now - first < self.black:
            db.execute(
                "UPDATE greylist SET last_seen = ?, attempts = attempts + 1" + where, (now, *key)
            )
            return EARLY
        db.execute(
            "UPDATE greylist SET last_seen = ?, white = 1, attempts = attempts + 1" + where,
            (now, *key),
        )
        return PASSED


class Greylisting(Plugin):
    """Defers unknown triplets at ``RCPT``; see the module docstring."""

    def register(self, *args: str) -> None:
        options = parse_options(
            self.name,
            args,
            {"db": "./greylist.db", "redis": "", "redis_timeout": "2",
             "black_timeout": "3000", "grey_timeout": "12000", "white_timeout": "3110400",
             "mode": "denysoft"},
            {"mode": ("denysoft", "testonly")},
            numbers=["black_timeout", "grey_timeout", "white_timeout", "redis_timeout"],
        )  # fmt: skip
        black, grey, white = (
            float(options[name]) for name in ("black_timeout", "grey_timeout", "white_timeout")
        )
        if min(black, grey, white) < 0 or black > grey:
            raise ValueError("timeouts must not be negative, and black_timeout <= grey_timeout")
        self.store: GreyStore | RedisGreyStore
        if options["redis"]:
            timeout = float(options["redis_timeout"])
            if timeout <= 0:
                raise ValueError("redis_timeout must be positive")
            self.store = RedisGreyStore(options["redis"], black, grey, white, timeout)
        else:
            self.store = GreyStore(self.config.path(options["db"]), black, grey, white)
        self.testonly = options["mode"] == "testonly"

    def detach(self) -> None:
        """Disconnect from Redis (after a reload replaced this plugin, at shutdown); the
        SQLite store holds nothing open between calls."""
        if isinstance(self.store, RedisGreyStore):
            self.store.close()

    async def hook_rcpt(self, transaction: Any, recipient: Address, params: Any) -> Any:
        conn = transaction.connection
        if conn.relay_client or conn.auth_user or conn.remote_ip is None:
            record(transaction, self.name, "skip", "relay client or authenticated user",
                   stage="rcpt")  # fmt: skip
            return DECLINED
        sender = transaction.sender
        key = (
            triplet_network(conn.remote_ip),
            "" if sender is None or sender.is_null else sender.address.lower(),
            recipient.address.lower(),
        )
        now = float(self.server.clock.seconds())
        try:
            decision = await run_in_pool("greylist", self.store.check, key, now)
        except self.store.errors as exc:
            self.log.warn("greylisting: cannot use {path}: {error}", path=self.store.path,
                          error=exc)  # fmt: skip
            record(transaction, self.name, "temperror", f"database: {exc}", stage="rcpt")
            return DECLINED
        triplet = f"{key[0]} <{key[1]}> <{key[2]}>"
        if decision in (PASSED, WHITE):
            record(transaction, self.name, "pass", f"{decision}: {triplet}", stage="rcpt")
            return DECLINED
        action = "log" if self.testonly else "tempfail"
        record(transaction, self.name, "fail", f"{decision}: {triplet}", stage="rcpt",
               action=action)  # fmt: skip
        if self.testonly:
            return DECLINED
        return DENYSOFT, "4.7.1 Greylisted, try again later"
