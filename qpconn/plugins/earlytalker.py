"""earlytalker: refuse clients that talk before the greeting, as qpsmtpd's plugin does.

A real SMTP client waits for the ``220`` before it says anything (RFC 5321 §3.1); many
spam bots do not. The ``connect`` hook holds the greeting back for ``wait`` seconds, and
any byte the client sends before the greeting goes out marks it an early talker (the
server notes that in ``connection.notes["early_talker"]``, reading the socket while the
greeting is prepared for exactly this purpose).

Arguments, as ``name value`` pairs (qpsmtpd's names)::

    earlytalker wait 1 action denysoft defer-reject 0

* ``wait N`` -- seconds to hold the greeting (default 1; fractions allowed). This delays
  every connection by that much, which is the point: bots do not wait.
* ``action deny|denysoft|log`` -- ``deny``: 550 5.7.1, ``denysoft``: 450 4.7.1 (the default,
  as in qpsmtpd: a mistake costs a legitimate client a retry, not a bounce), ``log``:
  only log (and keep the note for other plugins).
* ``defer-reject 0|1`` -- with 1, the client is greeted normally and refused at ``MAIL``
  instead of at connect, so that the refusal can be logged with its sender.

Relay clients (``connection.relay_client``, set by ``relay`` listed before this plugin)
are not delayed and never refused.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from qpconn.hooks.results import DECLINED, DENY, DENYSOFT, Result
from qpconn.hooks.verdicts import with_class
from qpconn.plugins import Plugin

__all__ = ["EarlyTalker"]

_MESSAGE = "5.7.1 Connecting host started transmitting before SMTP greeting"
_ACTIONS = {"deny": DENY, "denysoft": DENYSOFT, "log": None}
#: the note the server sets when bytes arrive before the greeting
NOTE = "early_talker"


class EarlyTalker(Plugin):
    """Hold the greeting for ``wait`` seconds; refuse a client that spoke meanwhile."""

    def register(self, *args: str) -> None:
        if len(args) % 2:
            raise ValueError("arguments come in pairs: wait N, action X, defer-reject 0|1")
        options = dict(zip(args[::2], args[1::2], strict=True))
        unknown = set(options) - {"wait", "action", "defer-reject"}
        if unknown:
            raise ValueError(f"unknown argument {sorted(unknown)[0]!r}")
        try:
            self.wait = float(options.get("wait", "1"))
        except ValueError:
            raise ValueError(f"wait: {options['wait']!r} is not a number") from None
        if not 0 <= self.wait <= 60:
            raise ValueError(f"wait: {self.wait} must be between 0 and 60 seconds")
        action = options.get("action", "denysoft").lower()
        if action not in _ACTIONS:
            raise ValueError(f"action: {action!r} is not deny, denysoft or log")
        self.action = action
        defer_reject = options.get("defer-reject", "0")
        if defer_reject not in ("0", "1"):
            raise ValueError(f"defer-reject: {defer_reject!r} is not 0 or 1")
        self.defer_reject = defer_reject == "1"
        # The hook waits on purpose: never let plugin_timeout cut the wait short.
        self.timeout = self.wait + 10.0

    def _clock(self) -> Any:
        if self.server is not None:
            return self.server.clock
        from twisted.internet import reactor

        return reactor

    def _refusal(self) -> tuple[Result, str] | None:
        result = _ACTIONS[self.action]
        if result is None:
            return None
        # a 450 carries 4.7.1, not "450 4.7.1 5.7.1 ..." (RFC 3463: the classes agree)
        return result, with_class(_MESSAGE, "4" if result is DENYSOFT else "5")

    def hook_connect(self, transaction: Any) -> Deferred[Any] | Result:
        connection = transaction.connection
        if connection.relay_client:
            return DECLINED
        return task.deferLater(self._clock(), self.wait, self._judge, connection)

    def _judge(self, connection: Any) -> Result | tuple[Result, str]:
        if not connection.notes.get(NOTE):
            return DECLINED
        self.log.info(
            "{conn_id} early talker from {remote_ip} (action {action}{deferred})",
            conn_id=connection.id,
            remote_ip=connection.remote_ip,
            action=self.action,
            deferred=", at MAIL" if self.defer_reject else "",
        )
        refusal = self._refusal()
        if refusal is None or self.defer_reject:
            return DECLINED
        return refusal

    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Result | tuple[Result, str]:
        connection = transaction.connection
        if not self.defer_reject or connection.relay_client or not connection.notes.get(NOTE):
            return DECLINED
        return self._refusal() or DECLINED
