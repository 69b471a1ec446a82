"""Connection: what is known about one TCP connection, for its whole life.

The API is qpsmtpd's ``Qpsmtpd::Connection`` in Python form (attributes instead of
accessor methods, ``notes`` usable both as a mapping and as qpsmtpd's ``notes(key,
value)`` call). A :class:`qpconn.mail.transaction.Transaction` lasts from MAIL to the end of
DATA or RSET; a Connection lasts until the client disconnects.
"""

from __future__ import annotations

import itertools
import os
import secrets
from typing import Any

__all__ = ["Connection", "Notes"]

_MISSING: Any = object()
# A per-process random prefix keeps ids unique across restarts and worker processes
# without a lookup or a lock; the counter keeps them cheap and ordered within a process.
_PREFIX = secrets.token_hex(3)
_counter = itertools.count(1)


_process_prefix = ""


def _set_process_prefix() -> None:
    """The id prefix of this process (again in a forked child: --workers)."""
    global _process_prefix
    _process_prefix = f"{_PREFIX}{os.getpid() & 0xFFFF:04x}"


_set_process_prefix()
os.register_at_fork(after_in_child=_set_process_prefix)


def new_id() -> str:
    """A short id, unique across processes, for log lines and queue ids."""
    return f"{_process_prefix}{next(_counter):06x}"


class Notes(dict[str, Any]):
    """A dict that also answers qpsmtpd's ``notes(key)`` / ``notes(key, value)`` calls."""

    def __call__(self, key: str, value: Any = _MISSING) -> Any:
        if value is _MISSING:
            return self.get(key)
        self[key] = value
        return value


# The fields that describe the TCP connection itself: clone() copies them, reset() and
# start() may set them. hello/hello_host describe the SMTP conversation and are not copied.
_PHYSICAL = (
    "remote_ip",
    "remote_port",
    "remote_host",
    "remote_host_verified",
    "remote_info",
    "local_ip",
    "local_port",
    "relay_client",
)
_FIELDS = frozenset((*_PHYSICAL, "hello", "hello_host", "tls", "auth_user", "auth_mechanism"))


class Connection:
    """Details of one SMTP connection: the peer, our side, the greeting, notes.

    ``hello`` ("helo" or "ehlo") and ``hello_host`` stay None while the helo/ehlo hooks
    run and are set only once they succeed, so a plugin never trusts a name it is still
    judging.
    """

    # Class-level defaults: a new or reset connection holds only its id and notes, so
    # making one (once per TCP connection) and resetting it set two attributes, not 14.
    remote_ip: str | None = None
    remote_port: int | None = None
    #: reverse DNS name of the peer, or None when there is none (or lookups are off)
    remote_host: str | None = None
    #: True when remote_host's forward lookup contains remote_ip (FCrDNS)
    remote_host_verified: bool = False
    #: RFC 1413 ident answer, when ident lookups are on and the peer answered
    remote_info: str | None = None
    local_ip: str | None = None
    local_port: int | None = None
    relay_client: bool = False
    hello: str | None = None
    hello_host: str | None = None
    #: TLS details (protocol, cipher) once the session is encrypted, else None
    tls: dict[str, str] | None = None
    auth_user: str | None = None
    auth_mechanism: str | None = None

    def __init__(self, **args: Any) -> None:
        self.id = new_id()
        self.notes = Notes()
        if args:
            self.start(**args)

    def _clear(self) -> None:
        fields = self.__dict__
        conn_id = fields["id"]
        fields.clear()  # every field reads its class default again
        fields["id"] = conn_id
        self.notes = Notes()

    def start(self, **args: Any) -> Connection:
        """Initialise the connection from keyword arguments (qpsmtpd's ``start(%args)``).

        Unknown names are refused rather than silently stored: a typo in a field name
        would otherwise make a plugin read None forever.
        """
        unknown = set(args) - _FIELDS - {"notes"}
        if unknown:
            raise TypeError(f"unknown Connection fields: {', '.join(sorted(unknown))}")
        for key, value in args.items():
            if key == "notes":
                self.notes = Notes(value)
            else:
                setattr(self, key, value)
        return self

    def clone(self, no_reset: bool = False) -> Connection:
        """A copy of the physical fields and the notes, without hello/hello_host.

        Unless ``no_reset`` is true the original is reset, as qpsmtpd does: the clone
        carries on (after STARTTLS, or along a forked delivery path). With ``no_reset``
        the caller keeps both and must reset the original itself; the server resets only
        the connection it is using when the session ends.
        """
        copy = Connection()
        for name in _PHYSICAL:
            setattr(copy, name, getattr(self, name))
        copy.notes = Notes(self.notes)
        if not no_reset:
            self.reset()
        return copy

    def reset(self) -> None:
        """Forget everything: fields and notes (the id stays, for the logs)."""
        self._clear()

    @property
    def remote_host_or_unknown(self) -> str:
        """The name for headers and greetings: qpsmtpd's "Unknown" becomes RFC "unknown"."""
        return self.remote_host or "unknown"

    def __repr__(self) -> str:
        return (
            f"<Connection {self.id} {self.remote_ip}:{self.remote_port}"
            f" -> {self.local_ip}:{self.local_port}>"
        )
