"""limit: how much one client, sender, domain or user may do, counted across every node.

haraka-plugin-limit's set of limits, each off unless given:

* ``concurrency N``: sessions open at once from one client address;
* ``rate_conn N/PERIOD``: sessions one address may open per period;
* ``rate_rcpt_host N/PERIOD``, ``rate_rcpt_sender N/PERIOD``, ``rate_rcpt_domain N/PERIOD``:
  recipients per period from one address, one envelope sender, one sender domain;
* ``rate_msg_user N/PERIOD``: messages (MAIL commands, as Postfix's
  ``smtpd_client_message_rate_limit`` counts them) per period of one authenticated user;
* ``unrecognized_commands N``, ``errors N``: per session, unknown commands and refusals.

A period is ``90`` (seconds), ``30s``, ``5m``, ``1h`` or ``1d``. With ``redis URL`` the
counters live in Redis and every node using that URL shares them
(:mod:`qpconn.kit.limitstore`: one Lua script per update, keys that expire); without it
they live in this process. The server's own ``max_connections_per_ip`` and
``max_connection_rate`` (:mod:`qpconn.smtp.limits`) count per process before any hook,
at almost no cost: they are the first line against a flood, and this plugin is the
cluster-wide one (a client spreading its sessions over the nodes behind one MX name meets
the same count on each).

When Redis cannot be used, ``on_error accept`` (the default) lets the command through,
unchecked: a limit is there against abuse, and refusing all mail while its counters are
away would turn a Redis outage into a mail outage. ``on_error tempfail`` gives 421 at
connect and 451 later instead. Either way the outage is logged once
(:class:`qpconn.kit.redisstate.RedisOutage`), Redis is left alone for a few seconds after
a failure, and the next call after that reconnects by itself.

Relay clients (``relay``, listed before this plugin) are exempt from the per-address
limits; the sender, domain and user limits apply to everyone. List it before ``rcpt_ok``.
"""

from __future__ import annotations

from typing import Any

from qpconn.hooks.results import DECLINED, DENYSOFT, DENYSOFT_DISCONNECT, DONE
from qpconn.hooks.verdicts import record
from qpconn.kit.limitstore import MemoryLimits, Rate, RedisLimits
from qpconn.kit.policy import parse_options
from qpconn.kit.redisstate import RedisOutage
from qpconn.kit.threads import run_in_pool
from qpconn.plugins import Plugin

__all__ = ["Limit"]

NOTE = "limit"
RATES = ("rate_conn", "rate_rcpt_host", "rate_rcpt_sender", "rate_rcpt_domain", "rate_msg_user")
COUNTS = ("concurrency", "unrecognized_commands", "errors")
#: the hooks at which a session over ``errors`` is told so and closed
ERROR_HOOKS = ("helo", "ehlo", "mail", "rcpt", "data", "vrfy", "noop", "help")

_TEXT = {
    "concurrency": "Too many connections from your address",
    "rate_conn": "Too many connections from your address in a short time",
    "rate_rcpt_host": "Too many recipients from your address in a short time",
    "rate_rcpt_sender": "Too many recipients from this sender in a short time",
    "rate_rcpt_domain": "Too many recipients from this sender's domain in a short time",
    "rate_msg_user": "Too many messages from you in a short time",
}


class _Unavailable(Exception):
    """The counters could not be used (already logged by the outage)."""


class Limit(Plugin):
    """Counts sessions, recipients, messages and errors; see the module docstring."""

    #: what _hook_up may register, depending on which limits are configured
    registers_hooks = ("connect", "disconnect", "unrecognized_command", "deny", *ERROR_HOOKS)

    def register(self, *args: str) -> None:
        defaults = {"redis": "", "redis_timeout": "2", "on_error": "accept",
                    "concurrency_ttl": "3600", **dict.fromkeys(COUNTS, "0"),
                    **dict.fromkeys(RATES, "")}  # fmt: skip
        options = parse_options(
            self.name, args, defaults, {"on_error": ("accept", "tempfail")},
            numbers=["redis_timeout", "concurrency_ttl"],
        )  # fmt: skip
        counts = {}
        for name in COUNTS:
            if not options[name].isdigit():
                raise ValueError(f"{name} must be a whole number, not {options[name]!r}")
            counts[name] = int(options[name])
        self.concurrency, self.unrecognized, self.errors = (counts[n] for n in COUNTS)
        self.rates = {name: Rate.parse(options[name]) for name in RATES if options[name]}
        if not any(counts.values()) and not self.rates:
            known = ", ".join(COUNTS + RATES)
            raise ValueError(f"no limit given (give at least one of {known})")
        self.ttl = float(options["concurrency_ttl"])
        if self.ttl <= 0:
            raise ValueError("concurrency_ttl must be positive")
        self.tempfail = options["on_error"] == "tempfail"
        self.store: MemoryLimits | RedisLimits
        if options["redis"]:
            self.store = RedisLimits(options["redis"], float(options["redis_timeout"]))
        else:
            self.store = MemoryLimits()
        policy = "giving 421/451" if self.tempfail else "letting everything through unchecked"
        self.outage = RedisOutage(self.name, self.store.path, self.log, policy)
        self._hook_up()

    def detach(self) -> None:
        """Disconnect from Redis (after a reload replaced this plugin, at shutdown)."""
        if isinstance(self.store, RedisLimits):
            self.store.close()

    def _hook_up(self) -> None:
        """Only the hooks the configured limits need: a limit that is off costs nothing."""
        rates = self.rates
        if self.concurrency or "rate_conn" in rates:
            self.register_hook("connect", self.check_connect)
        if self.concurrency:
            self.register_hook("disconnect", self.release)
        if self.errors or self.concurrency or "rate_msg_user" in rates:
            self.register_hook("mail", self.check_mail)
        if self.errors or any(name.startswith("rate_rcpt") for name in rates):
            self.register_hook("rcpt", self.check_rcpt)
        if self.errors:
            for hook in ERROR_HOOKS:
                if hook not in ("mail", "rcpt"):
                    self.register_hook(hook, self.check_errors)
            self.register_hook("deny", self.count_error)
        if self.unrecognized or self.errors:
            self.register_hook("unrecognized_command", self.check_unrecognized)

    # -- the store, in a worker (Redis) or directly (memory) --------------------------------
    async def _ask(self, function: Any, *args: Any) -> Any:
        if isinstance(self.store, MemoryLimits):
            return function(*args)
        if self.outage.holding():
            raise _Unavailable("not asked: it failed less than a few seconds ago")
        try:
            result = await run_in_pool("limit", function, *args)
        except self.store.errors as exc:
            self.outage.failed(exc)
            raise _Unavailable(str(exc)) from exc
        self.outage.answered()
        return result

    def _now(self) -> float:
        return float(self.server.clock.seconds()) if self.server is not None else 0.0

    def _me(self) -> str:
        return str(self.server.me) if self.server is not None else self.config.me

    def _notes(self, transaction: Any) -> dict[str, Any]:
        notes: dict[str, Any] = transaction.connection.notes.setdefault(NOTE, {})
        return notes

    def _unchecked(self, transaction: Any, stage: str, error: Exception) -> Any:
        """What Redis being away means for this command: through (default) or 421/451."""
        action = "tempfail" if self.tempfail else "accept"
        record(transaction, self.name, "temperror", f"store: {error}", stage=stage, action=action)
        if not self.tempfail:
            return DECLINED
        if stage == "connect":
            return DONE, f"421 4.3.0 {self._me()} Limits cannot be checked now, try again later"
        return DONE, "451 4.3.0 Limits cannot be checked now, try again later"

    def _refused(self, transaction: Any, stage: str, limit: str, subject: str) -> None:
        record(transaction, self.name, "fail", f"{limit} {subject}", stage=stage,
               action="tempfail")  # fmt: skip
        self.log.info(
            "{conn_id} {limit} reached by {subject} at {stage}",
            conn_id=transaction.connection.id,
            limit=limit,
            subject=subject,
            stage=stage,
            event="limit_refused",
        )

    # -- connect, disconnect ------------------------------------------------------------
    def _admit(self, ip: str, member: str, now: float) -> str | None:
        """Occupy a place and count the connection; the limit that refused, if any."""
        store = self.store
        occupied = False
        if self.concurrency:
            if store.occupy(f"concurrency:{ip}", member, self.concurrency, self.ttl, now) < 0:
                return "concurrency"
            occupied = True
        rate = self.rates.get("rate_conn")
        if rate is not None and store.take([(f"rate_conn:{ip}", rate)], now) is not None:
            if occupied:
                store.vacate(f"concurrency:{ip}", member)
            return "rate_conn"
        return None

    async def check_connect(self, transaction: Any) -> Any:
        connection = transaction.connection
        ip = connection.remote_ip
        if ip is None or connection.relay_client:
            return DECLINED
        try:
            refused = await self._ask(self._admit, ip, connection.id, self._now())
        except _Unavailable as exc:
            return self._unchecked(transaction, "connect", exc)
        if refused is None:
            if self.concurrency:
                self._notes(transaction)["occupied"] = f"concurrency:{ip}"
            return DECLINED
        self._refused(transaction, "connect", refused, ip)
        return DONE, f"421 4.7.0 {self._me()} {_TEXT[refused]}, try again later"

    async def release(self, transaction: Any) -> None:
        notes = transaction.connection.notes.get(NOTE)
        key = notes.pop("occupied", None) if notes else None
        if key is None:
            return
        try:
            await self._ask(self.store.vacate, key, transaction.connection.id)
        except _Unavailable:
            pass  # the place expires after concurrency_ttl by itself (logged by the outage)

    # -- per command ---------------------------------------------------------------------
    def _too_many_errors(self, transaction: Any) -> Any:
        if self.errors and self._notes(transaction).get("errors", 0) >= self.errors:
            self._refused(transaction, "command", "errors", transaction.connection.id)
            return DENYSOFT_DISCONNECT, "4.7.0 Too many errors, closing connection"
        return None

    def check_errors(self, transaction: Any, *args: Any) -> Any:
        return self._too_many_errors(transaction) or DECLINED

    def count_error(
        self, transaction: Any, plugin: Any, hook: Any, result: Any, message: Any
    ) -> None:
        """A refusal (or a hook's error) counts against ``errors``, once per command."""
        if transaction is None:
            return
        notes = self._notes(transaction)
        if hook == "unrecognized_command" and notes.pop("counted", False):
            return  # check_unrecognized counted this command already
        notes["errors"] = notes.get("errors", 0) + 1

    def check_unrecognized(self, transaction: Any, verb: str, arg: str) -> Any:
        refusal = self._too_many_errors(transaction)
        if refusal is not None:
            return refusal
        notes = self._notes(transaction)
        notes["errors"] = notes.get("errors", 0) + 1  # the 500 it gets is an error too
        notes["counted"] = True
        count = notes["unrecognized"] = notes.get("unrecognized", 0) + 1
        if self.unrecognized and count >= self.unrecognized:
            self._refused(transaction, "unrecognized_command", "unrecognized_commands",
                          transaction.connection.id)  # fmt: skip
            return DENYSOFT_DISCONNECT, "4.7.0 Too many unrecognized commands, closing connection"
        return DECLINED

    async def check_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        refusal = self._too_many_errors(transaction)
        if refusal is not None:
            return refusal
        connection = transaction.connection
        occupied = (connection.notes.get(NOTE) or {}).get("occupied")
        rate = self.rates.get("rate_msg_user")
        user = connection.auth_user if rate is not None else None
        if not occupied and not user:
            return DECLINED
        now = self._now()

        def work() -> int | None:
            if occupied:  # a long session stays counted while it sends mail
                self.store.refresh(occupied, connection.id, self.ttl, now)
            return self.store.take([(f"rate_msg_user:{user}", rate)], now) if user else None

        try:
            full = await self._ask(work)
        except _Unavailable as exc:
            return self._unchecked(transaction, "mail", exc)
        if full is None:
            return DECLINED
        self._refused(transaction, "mail", "rate_msg_user", str(user))
        return DENYSOFT, f"4.7.1 {_TEXT['rate_msg_user']}, try again later"

    async def check_rcpt(self, transaction: Any, recipient: Any, params: Any) -> Any:
        refusal = self._too_many_errors(transaction)
        if refusal is not None:
            return refusal
        counters = self._recipient_counters(transaction)
        if not counters:
            return DECLINED
        try:
            full = await self._ask(self.store.take, [(k, r) for _, k, r in counters], self._now())
        except _Unavailable as exc:
            return self._unchecked(transaction, "rcpt", exc)
        if full is None:
            return DECLINED
        limit, key, _ = counters[full]
        self._refused(transaction, "rcpt", limit, key.split(":", 1)[1])
        return DENYSOFT, f"4.7.1 {_TEXT[limit]}, try again later"

    def _recipient_counters(self, transaction: Any) -> list[tuple[str, str, Rate]]:
        """(limit, counter key, rate) for each recipient limit that applies here."""
        rates, connection, sender = self.rates, transaction.connection, transaction.sender
        counters = []
        rate = rates.get("rate_rcpt_host")
        if rate is not None and connection.remote_ip and not connection.relay_client:
            counters.append(("rate_rcpt_host", f"rate_rcpt_host:{connection.remote_ip}", rate))
        null = sender is None or sender.is_null
        rate = rates.get("rate_rcpt_sender")
        if rate is not None:
            address = "<>" if null else sender.address.lower()
            counters.append(("rate_rcpt_sender", f"rate_rcpt_sender:{address}", rate))
        rate = rates.get("rate_rcpt_domain")
        if rate is not None and not null and sender.domain:
            counters.append(("rate_rcpt_domain", f"rate_rcpt_domain:{sender.domain}", rate))
        return counters
