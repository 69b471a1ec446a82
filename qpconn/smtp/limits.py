"""Session and server limits read from the config directory, and the live connection count.

Every limit an abusive client could otherwise push past lives here, read once at start-up
(so a typo stops the server instead of surfacing with the first attack):

* ``max_rcpt`` -- accepted recipients per transaction; the next one gets
  ``452 4.5.3`` (RFC 5321 §4.5.3.1.8 requires at least 100 to be accepted, hence the default).
* ``max_errors`` -- protocol errors and 5xx replies a client may collect without delivering
  a message before it gets ``421 4.7.0`` and is disconnected (Postfix's
  ``smtpd_hard_error_limit``): a client that only produces errors is not a mail client.
* ``data_timeout`` -- silence allowed in the middle of message text; unset means the same as
  ``timeout``, as in qpsmtpd, which has one timeout for both.
* ``max_connections``, ``max_connections_per_ip`` -- concurrent sessions in all and from one
  address; the next connection gets ``421 4.7.0`` before any lookup or hook costs anything.
  Per address the limit is on by default (50, Postfix's ``smtpd_client_connection_count_limit``):
  one address holding thousands of sessions is an attack, not a mail client.
* ``max_connection_rate`` per ``connection_rate_window`` -- sessions one address may open
  in that many seconds (Postfix anvil's ``smtpd_client_connection_rate_limit`` per
  ``anvil_rate_time_unit``), 60 a minute by default.
* ``connection_limit_exceptions`` -- the addresses the two per-address limits do not apply
  to; without the file, loopback and the ``relayclients`` (Postfix exempts ``$mynetworks``).
* ``bare_newline`` -- what a bare CR or LF in message text earns: ``reject`` (refused at the
  end of DATA) or ``normalize`` (stored as CRLF). Neither lets a bare one end the message.
* ``command_deadline``, ``min_data_rate`` after ``data_rate_grace``, ``max_session_time`` --
  what a session may take however it trickles (the idle timers restart with every byte):
  seconds for one command line from its first byte (unset: ``timeout``, at most 60), octets
  per second of message text once its first seconds are over (unset grace: ``data_timeout``,
  at most 30), seconds for the whole session (3600). Applied by
  :mod:`qpconn.server.deadlines`; ``0`` turns each off.

Pure Python: no Twisted here, so the core's tests and plugins can use it as well.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qpconn.config import ConfigError
from qpconn.kit.policy import NetworkList

if TYPE_CHECKING:
    from qpconn.config import Config

__all__ = [
    "SessionLimits",
    "ConnectionCounter",
    "BARE_NEWLINE_POLICIES",
    "TOO_MANY",
    "TOO_MANY_FROM_ADDRESS",
    "TOO_FAST_FROM_ADDRESS",
    "COMMAND_DEADLINE_CAP",
    "DATA_RATE_GRACE_CAP",
    "limit_exceptions",
]

#: Why :meth:`ConnectionCounter.admit` refuses a connection: the setting that refused it.
TOO_MANY = "max_connections"
TOO_MANY_FROM_ADDRESS = "max_connections_per_ip"
TOO_FAST_FROM_ADDRESS = "max_connection_rate"
#: Exempt from the per-address limits without ``connection_limit_exceptions``, with the
#: relay clients (Postfix exempts ``$mynetworks``, which holds loopback by default).
LOOPBACK = ("127.0.0.0/8", "::1")
#: Addresses whose recent connections are remembered at most: beyond, the oldest window
#: is forgotten early (that address may connect again sooner, never later).
RATE_TABLE_SIZE = 100_000

#: The values the ``bare_newline`` setting may take.
BARE_NEWLINE_POLICIES = ("reject", "normalize")

#: ``command_deadline`` without the file: the idle ``timeout``, but never more than this. A
#: real client sends a command line in one segment; a person typing one needs seconds.
COMMAND_DEADLINE_CAP = 60.0
#: ``data_rate_grace`` without the file: ``data_timeout``, but never more than this.
DATA_RATE_GRACE_CAP = 30.0


def _not_negative(name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{name}: {value!r} must not be negative")


@dataclass(frozen=True)
class SessionLimits:
    """What the config says about the limits; 0 means unlimited wherever a count is meant."""

    max_rcpt: int = 100
    max_errors: int = 20
    #: seconds of silence allowed mid-DATA; None: the idle ``timeout``; 0: no limit
    data_timeout: float | None = None
    max_connections: int = 0
    max_connections_per_ip: int = 50
    bare_newline: str = "reject"
    #: sessions one address may open per ``connection_rate_window`` seconds; 0: no limit
    max_connection_rate: int = 60
    connection_rate_window: float = 60.0
    #: seconds a command line may take from its first byte; None: see command_deadline_for
    command_deadline: float | None = None
    #: octets per second message text must average after the grace (Postfix's
    #: smtpd_min_data_rate); 0: no minimum
    min_data_rate: int = 500
    #: seconds of message text before min_data_rate applies; None: see data_rate_grace_for
    data_rate_grace: float | None = None
    #: seconds a whole session may last; 0: no limit
    max_session_time: float = 3600.0

    @classmethod
    def from_config(cls, config: Config) -> SessionLimits:
        """Read and check every limit; a bad value is a ConfigError naming the file."""
        max_rcpt = config.get_int("max_rcpt", 100)
        max_errors = config.get_int("max_errors", 20)
        max_connections = config.get_int("max_connections", 0)
        per_ip = config.get_int("max_connections_per_ip", 50)
        rate = config.get_int("max_connection_rate", 60)
        window = config.get_float("connection_rate_window", 60.0)
        if window <= 0:
            raise ConfigError(f"connection_rate_window: {window!r} must be more than 0")
        # Unset, these three are worked out from others (the methods below): None.
        data_timeout: float | None = None
        command_deadline: float | None = None
        data_rate_grace: float | None = None
        if config.get("data_timeout") is not None:
            data_timeout = config.get_float("data_timeout", 0.0)
        if config.get("command_deadline") is not None:
            command_deadline = config.get_float("command_deadline", 0.0)
        if config.get("data_rate_grace") is not None:
            data_rate_grace = config.get_float("data_rate_grace", 0.0)
        min_data_rate = config.get_int("min_data_rate", 500)
        max_session_time = config.get_float("max_session_time", 3600.0)
        for name, value in (
            ("max_rcpt", max_rcpt),
            ("max_errors", max_errors),
            ("max_connections", max_connections),
            ("max_connections_per_ip", per_ip),
            ("max_connection_rate", rate),
            ("min_data_rate", min_data_rate),
            ("data_timeout", data_timeout or 0),
            ("command_deadline", command_deadline or 0),
            ("data_rate_grace", data_rate_grace or 0),
            ("max_session_time", max_session_time),
        ):
            _not_negative(name, value)
        bare = (config.get("bare_newline") or "reject").lower()
        if bare not in BARE_NEWLINE_POLICIES:
            raise ConfigError(f"bare_newline: {bare!r} is not one of reject, normalize")
        return cls(
            max_rcpt, max_errors, data_timeout, max_connections, per_ip, bare, rate, window,
            command_deadline=command_deadline,
            min_data_rate=min_data_rate,
            data_rate_grace=data_rate_grace,
            max_session_time=max_session_time,
        )  # fmt: skip

    @property
    def normalize_newlines(self) -> bool:
        return self.bare_newline == "normalize"

    def data_timeout_or(self, idle: float) -> float | None:
        """The DATA-phase timeout given the idle one; None when there is none."""
        value = idle if self.data_timeout is None else self.data_timeout
        return value or None

    def command_deadline_for(self, idle: float) -> float | None:
        """Seconds a command line may take from its first byte; None when there is no limit.

        Unset, the idle ``timeout`` up to :data:`COMMAND_DEADLINE_CAP`: a line trickled in
        never gets more time than silence would.
        """
        if self.command_deadline is None:
            return min(idle, COMMAND_DEADLINE_CAP)
        return self.command_deadline or None

    def data_rate_grace_for(self, idle: float) -> float:
        """Seconds of message text before ``min_data_rate`` applies.

        Unset, ``data_timeout`` (itself the idle ``timeout`` by default) up to
        :data:`DATA_RATE_GRACE_CAP`.
        """
        if self.data_rate_grace is not None:
            return self.data_rate_grace
        silence = self.data_timeout_or(idle)
        return min(silence, DATA_RATE_GRACE_CAP) if silence else DATA_RATE_GRACE_CAP


def limit_exceptions(config: Config) -> NetworkList:
    """The addresses the per-address connection limits do not apply to.

    ``connection_limit_exceptions`` when the file exists (empty: nobody is exempt, which
    is how the tests apply the limits to loopback); otherwise loopback and every
    ``relayclients``/``morerelayclients`` entry, as Postfix exempts ``$mynetworks``, and the
    ``xclient_hosts`` proxies (their clients are counted by the address XCLIENT gives).
    """
    if config.is_set("connection_limit_exceptions"):
        lines = config.lines("connection_limit_exceptions")
        return NetworkList("connection_limit_exceptions", lines)
    relay = config.lines("relayclients") + config.lines("morerelayclients")
    proxies = config.lines("xclient_hosts")
    return NetworkList("relayclients", [*LOOPBACK, *relay, *proxies])


class ConnectionCounter:
    """Sessions open now, in all and per client address, and the sessions each address
    opened lately, for the connection limits.

    The adapter asks :meth:`admit` once the client's real address is known (after a PROXY
    header) and calls :meth:`release` exactly once for each admitted session. A refused
    connection is never counted, so a flood of refused connections does not lock out the
    clients that are already being served.

    The rate is counted as Postfix's anvil counts it: a window of
    ``connection_rate_window`` seconds starts at an address's first connection, and
    the address may open ``max_connection_rate`` sessions in it. Windows live in an
    ordered dict, oldest first, so expired ones are dropped from its front as time goes
    on: the table holds only the addresses seen in the last window (and at most
    :data:`RATE_TABLE_SIZE`), and a connection costs a lookup, not a sweep.
    """

    def __init__(self, table_size: int = RATE_TABLE_SIZE) -> None:
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        #: address -> [start of its window, sessions admitted in it], oldest window first
        self.recent: OrderedDict[str, list[float]] = OrderedDict()
        self.table_size = table_size

    def admit(
        self,
        ip: str | None,
        limits: SessionLimits,
        now: float = 0.0,
        exempt: bool = False,
    ) -> str | None:
        """Count a new session, or return the limit that refuses it (and count nothing).

        ``now`` is the clock's time in seconds; ``exempt`` addresses (see
        :func:`limit_exceptions`) skip the per-address limits but still count in all.
        """
        if limits.max_connections and self.total >= limits.max_connections:
            return TOO_MANY
        if ip is not None and not exempt:
            per_ip = limits.max_connections_per_ip
            if per_ip and self.per_ip[ip] >= per_ip:
                return TOO_MANY_FROM_ADDRESS
            if limits.max_connection_rate and not self._count_rate(ip, limits, now):
                return TOO_FAST_FROM_ADDRESS
        self.total += 1
        if ip is not None:
            self.per_ip[ip] += 1
        return None

    def _count_rate(self, ip: str, limits: SessionLimits, now: float) -> bool:
        """One more session of ``ip`` in its window; False (nothing counted) when full."""
        window = limits.connection_rate_window
        recent = self.recent
        while recent:  # drop the windows that are over, oldest first
            start = recent[next(iter(recent))][0]
            if now - window < start <= now:
                break  # a clock set back makes every window "over": forgotten, never stuck
            recent.popitem(last=False)
        entry = recent.get(ip)
        if entry is None:
            recent[ip] = [now, 1]
            if len(recent) > self.table_size:
                recent.popitem(last=False)
            return True
        if entry[1] >= limits.max_connection_rate:
            return False
        entry[1] += 1
        return True


    def release(self, ip: str | None) -> None:
        """Forget one admitted session; empty per-address entries are dropped (bounded)."""
        self.total -= 1
        if ip is not None:
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
