"""rcpt_verify: refuse at RCPT time what the next hop would refuse.

It asks the next hop about each recipient before answering the client.

Without it, a message to one known and one unknown recipient is accepted whole, and
``queue/smtp-forward`` reports the unknown one afterwards with a bounce to the sender,
who is often forged: backscatter. With it, the unknown recipient gets the next hop's own
refusal during our session (``550 5.1.1 <nobody@example.com>: Recipient address rejected:
User unknown in local recipient table``), the client keeps the failure on its side, and
the message goes on to the others only.

For every recipient in one of our domains (those of ``rcpt_ok``: ``me``, ``rcpthosts``,
``morercpthosts``; ``domains all`` asks about every recipient), the next hop is asked
with ``MAIL FROM:<>`` (``sender`` sets another), ``RCPT TO`` and ``RSET`` on a pooled
connection (:mod:`qpconn.client.verify`); over LMTP for ``queue/lmtp``'s mailbox store.
What it answers:

* 2xx: remembered for ``positive_ttl`` seconds (default 3600); the plugin declines, so
  ``rcpt_ok`` (listed after it) still decides about relaying: a next hop that would take
  anything never opens a relay here;
* 5xx: its reply, code and text as it gave them, is ours; remembered for
  ``negative_ttl`` seconds (default 300), so a mailbox created since is found soon;
* 4xx: its reply is ours, remembered not at all;
* no answer (down, slower than ``timeout`` seconds (default 10), garbage, or MAIL
  refused): ``on_error tempfail`` (the default) gives ``451 4.4.3`` and the client
  retries later, ``on_error accept`` declines, which leaves the recipient to
  ``rcpt_ok`` and a refusal to the bounce rule of ``queue/smtp-forward``.

At most ``cache_size`` verdicts (default 10000) are kept, least recently used first out,
so a dictionary attack cannot grow the process. Each answer or failure is one log line
(``event="plugin_outcome"``, counted by the metrics with ``outcome`` ``accepted``,
``refused``, ``deferred``, ``cached_accepted``, ``cached_refused``, ``unverifiable`` or
``error``).

The next hop: ``host``/``port`` (or ``socket /path``, ``lmtp yes`` for LMTP), else that of
the ``queue/smtp-forward`` or ``queue/lmtp`` line in ``plugins`` (its address, LMTP, TLS
settings), taken once the server is built. ``starttls``, ``tls_ca``, ``pool`` and ``idle``
are as for ``queue/smtp-forward``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from qpconn.client.forward import ForwardingQueue
from qpconn.client.pool import STARTTLS_MODES, ConnectionPool, Destination
from qpconn.client.smtp import ClientReply, NextHopError
from qpconn.client.verify import RecipientProbe, Unverifiable
from qpconn.hooks.results import DECLINED, DONE
from qpconn.kit.policy import parse_options
from qpconn.kit.ttlcache import TTLCache
from qpconn.mail.address import Address, AddressError
from qpconn.mail.smtputf8 import address_a_label, ascii_path
from qpconn.plugins import Plugin
from qpconn.plugins.rcpt_ok import RcptOk

__all__ = ["RcptVerify"]

_DEFAULTS = {
    "host": "", "port": "", "socket": "", "lmtp": "no", "sender": "<>",
    "positive_ttl": "3600", "negative_ttl": "300", "cache_size": "10000",
    "on_error": "tempfail", "timeout": "10", "domains": "local",
    "starttls": "no", "tls_ca": "", "pool": "2", "idle": "30",
}  # fmt: skip
_CHOICES = {
    "lmtp": ("no", "yes"),
    "on_error": ("tempfail", "accept"),
    "domains": ("local", "all"),
    "starttls": STARTTLS_MODES,
}
_NUMBERS = ["port", "positive_ttl", "negative_ttl", "cache_size", "timeout", "pool", "idle"]


def _reply_line(reply: ClientReply) -> str:
    return f"{reply.code} {reply.text}".rstrip()


class RcptVerify(Plugin):
    """Refuses at RCPT the recipients the next hop refuses; see the module docstring."""

    def register(self, *args: str) -> None:
        options = parse_options(self.name, args, _DEFAULTS, _CHOICES, numbers=_NUMBERS)
        self.destination = self._own_destination(options)
        self.sender = self._sender(options["sender"])
        self.positive_ttl = float(options["positive_ttl"])
        self.negative_ttl = float(options["negative_ttl"])
        self.on_error = options["on_error"]
        self.verify_timeout = float(options["timeout"])
        if self.verify_timeout <= 0:
            raise ValueError(f"{self.name}: timeout must be positive")
        self.every_domain = options["domains"] == "all"
        self.pool_size = int(float(options["pool"]))
        self.idle = float(options["idle"])
        self.cache: TTLCache[ClientReply] = TTLCache(
            int(float(options["cache_size"])), self._seconds
        )
        # the hook runner's limit stays above ours, so the client gets our 451 text
        self.timeout = self.verify_timeout + 5
        #: rcpt_ok's idea of our domains: only its recipients are worth asking about
        self.local = RcptOk(self.config, "rcpt_ok")
        self._probe: RecipientProbe | None = None

    def _own_destination(self, options: dict[str, str]) -> Destination | None:
        lmtp = options["lmtp"] == "yes"
        starttls, tls_ca = options["starttls"], options["tls_ca"] or None
        if options["socket"]:
            if options["host"] or options["port"]:
                raise ValueError(f"{self.name}: socket excludes host and port")
            return Destination(path=options["socket"], lmtp=lmtp, starttls=starttls,
                               tls_ca=tls_ca)  # fmt: skip
        if not options["host"]:
            if options["port"]:
                raise ValueError(f"{self.name}: port without host")
            return None  # the queue plugin's, at attach
        if not options["port"] and lmtp:
            raise ValueError(f"{self.name}: lmtp needs a port (LMTP has no default port)")
        port = int(float(options["port"] or 25))
        if not 0 < port < 65536:
            raise ValueError(f"{self.name}: port {port} is not a port number")
        return Destination(options["host"].strip("[]"), port, lmtp=lmtp, starttls=starttls,
                           tls_ca=tls_ca)  # fmt: skip

    def _sender(self, text: str) -> str:
        if text in ("<>", ""):
            return "<>"
        try:
            address = Address.parse(text if text.startswith("<") else f"<{text}>")
        except AddressError:
            raise ValueError(f"{self.name}: sender {text!r} is not an address") from None
        return address.format()

    def attach(self, server: Any) -> None:
        """Take the queue plugin's next hop when none was given (needs the plugin list)."""
        super().attach(server)
        if self.destination is None:
            queues = [p for p in server.plugins if isinstance(p, ForwardingQueue)]
            if len(queues) != 1:
                raise ValueError(
                    f"{self.name}: no host= given, and {len(queues)} queue/smtp-forward or "
                    "queue/lmtp lines to take the next hop from (need exactly one)"
                )
            self.destination = queues[0].destination
        self._probe = None  # a reload attaches anew

    def _clock(self) -> Any:
        """The server's clock (a test may give a fake one), else the reactor."""
        if self.server is not None:
            return self.server.clock
        from twisted.internet import reactor

        return reactor

    def _seconds(self) -> float:
        return float(self._clock().seconds())

    @property
    def probe(self) -> RecipientProbe:
        if self._probe is None or self._probe.pool.closed:
            if self.destination is None:
                raise NextHopError("no next hop known (the plugin was never attached)")
            me = self.server.me if self.server is not None else self.config.me
            pool = ConnectionPool(self.destination, helo=me, reactor=self._clock(),
                                  size=self.pool_size, idle_timeout=self.idle,
                                  connect_timeout=self.verify_timeout,
                                  resolver=getattr(self.server, "hostname_resolver",
                                                   None))  # fmt: skip
            self._probe = RecipientProbe(pool, self.sender)
        return self._probe

    def detach(self) -> Any:
        """QUIT the probe's pooled connections (after a reload, at shutdown)."""
        probe, self._probe = self._probe, None
        return probe.pool.close() if probe is not None and not probe.pool.closed else None

    # -- the hook ---------------------------------------------------------------------
    async def hook_rcpt(self, transaction: Any, recipient: Address, params: Any) -> Any:
        connection = transaction.connection
        if recipient.host is None or recipient.is_postmaster:
            return DECLINED  # <postmaster> is always ours to take (RFC 5321 §4.5.1)
        if not self.every_domain and not self.local.is_local(recipient, connection.local_ip):
            return DECLINED  # not ours: rcpt_ok refuses it or relays it
        key = (recipient.user, address_a_label(recipient))
        cached = self.cache.get(key)
        if cached is not None:
            outcome = "cached_accepted" if cached.positive else "cached_refused"
            self._outcome(transaction, recipient, outcome, f"{cached} (cached)")
            return DECLINED if cached.positive else (DONE, _reply_line(cached))
        utf8 = not recipient.user.isascii()
        path = recipient.format() if utf8 else ascii_path(recipient)
        asking = defer.Deferred.fromCoroutine(self.probe.ask(path, utf8))
        asking.addTimeout(self.verify_timeout, self._clock())
        try:
            reply = await asking
        except Unverifiable as exc:
            self._outcome(transaction, recipient, "unverifiable", str(exc))
            return DECLINED
        except (NextHopError, defer.TimeoutError, OSError) as exc:
            reason = "timed out" if isinstance(exc, defer.TimeoutError) else str(exc)
            return self._failed(transaction, recipient, reason)
        if reply.positive:
            self.cache.put(key, reply, self.positive_ttl)
            self._outcome(transaction, recipient, "accepted", str(reply))
            return DECLINED
        if reply.permanent:
            self.cache.put(key, reply, self.negative_ttl)
            self._outcome(transaction, recipient, "refused", str(reply))
        else:
            self._outcome(transaction, recipient, "deferred", str(reply))
        return DONE, _reply_line(reply)

    def _failed(self, transaction: Any, recipient: Address, reason: str) -> Any:
        label = self.destination.label if self.destination is not None else "?"
        self.log.warn(
            "{conn_id} rcpt_verify {rcpt}: next hop {dest} gave no answer ({reason}); "
            "on_error {policy}",
            conn_id=transaction.connection.id,
            rcpt=recipient.format(),
            dest=label,
            reason=reason,
            policy=self.on_error,
            event="plugin_outcome",
            plugin=self.name,
            outcome="error",
        )
        if self.on_error == "accept":
            return DECLINED
        return DONE, (
            f"451 4.4.3 Cannot verify {recipient.format()} with {label} ({reason}); try again later"
        )

    def _outcome(self, transaction: Any, recipient: Address, outcome: str, reply: str) -> None:
        self.log.info(
            "{conn_id} rcpt_verify {rcpt}: {reply}",
            conn_id=transaction.connection.id,
            rcpt=recipient.format(),
            reply=reply,
            event="plugin_outcome",
            plugin=self.name,
            outcome=outcome,
        )
