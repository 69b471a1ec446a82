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
* ``bare_newline`` -- what a bare CR or LF in message text earns: ``reject`` (refused at the
  end of DATA) or ``normalize`` (stored as CRLF). Neither lets a bare one end the message.

Pure Python: no Twisted here, so the core's tests and plugins can use it as well.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qpconn.config import ConfigError

if TYPE_CHECKING:
    from qpconn.config import Config

__all__ = ["SessionLimits", "ConnectionCounter", "BARE_NEWLINE_POLICIES"]

#: The values the ``bare_newline`` setting may take.
BARE_NEWLINE_POLICIES = ("reject", "normalize")


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
    max_connections_per_ip: int = 0
    bare_newline: str = "reject"

    @classmethod
    def from_config(cls, config: Config) -> SessionLimits:
        """Read and check every limit; a bad value is a ConfigError naming the file."""
        max_rcpt = config.get_int("max_rcpt", 100)
        max_errors = config.get_int("max_errors", 20)
        max_connections = config.get_int("max_connections", 0)
        per_ip = config.get_int("max_connections_per_ip", 0)
        data_timeout = None
        if config.get("data_timeout") is not None:
            data_timeout = config.get_float("data_timeout", 0.0)
            _not_negative("data_timeout", data_timeout)
        for name, value in (
            ("max_rcpt", max_rcpt),
            ("max_errors", max_errors),
            ("max_connections", max_connections),
            ("max_connections_per_ip", per_ip),
        ):
            _not_negative(name, value)
        bare = (config.get("bare_newline") or "reject").lower()
        if bare not in BARE_NEWLINE_POLICIES:
            raise ConfigError(f"bare_newline: {bare!r} is not one of reject, normalize")
        return cls(max_rcpt, max_errors, data_timeout, max_connections, per_ip, bare)

    @property
    def normalize_newlines(self) -> bool:
        return self.bare_newline == "normalize"

    def data_timeout_or(self, idle: float) -> float | None:
        """The DATA-phase timeout given the idle one; None when there is none."""
        value = idle if self.data_timeout is None else self.data_timeout
        return value or None


class ConnectionCounter:
    """Sessions open now, in all and per client address, for the connection limits.

    The adapter asks :meth:`admit` once the client's real address is known (after a PROXY
    header) and calls :meth:`release` exactly once for each admitted session. A refused
    connection is never counted, so a flood of refused connections does not lock out the
    clients that are already being served.
    """

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def admit(self, ip: str | None, limits: SessionLimits) -> str | None:
        """Count a new session, or return why it must be refused (and count nothing)."""
        if limits.max_connections and self.total >= limits.max_connections:
            return "too many connections"
        per_ip = limits.max_connections_per_ip
        if per_ip and ip is not None and self.per_ip[ip] >= per_ip:
            return "too many connections from this address"
        self.total += 1
        if ip is not None:
            self.per_ip[ip] += 1
        return None

    def release(self, ip: str | None) -> None:
        """Forget one admitted session; empty per-address entries are dropped (bounded)."""
        self.total -= 1
        if ip is not None:
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
