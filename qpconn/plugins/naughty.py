"""naughty: refuse, at one chosen stage, what other plugins found but did not refuse.

qpsmtpd's way of deferring rejections: a check plugin run with ``reject naughty`` does
not refuse at once but marks the session ``notes["naughty"]`` (on the connection when
the client itself is bad, on the transaction when one message is) with the reply it
would have given. This plugin gives that reply at the stage set by ``reject``:

* ``connect``: before the greeting (the cheapest: nothing else runs);
* ``mail``, ``rcpt`` (default), ``data``, ``data_post``: later, so that the client has
  shown what it sends (useful for logs and for ``karma``), and with ``rcpt`` the
  refusal names the recipient, which mass-mailers' logs show their operators.

A mark made after the chosen stage (``headers`` at ``data_post`` while the stage is
``rcpt``) is acted on at the next stage that comes. List ``naughty`` after the plugins
that mark at the same stage and before the plugins that accept (``rcpt_ok``).

Arguments: ``reject connect|mail|rcpt|data|data_post``.
"""

from __future__ import annotations

from typing import Any

from qpconn.hooks.results import DENY, DENY_DISCONNECT, DENYSOFT, DENYSOFT_DISCONNECT, Result
from qpconn.hooks.verdicts import naughty_mark, record, with_class
from qpconn.plugins import Plugin

STAGES = ("connect", "mail", "rcpt", "data", "data_post")


class Naughty(Plugin):
    """Gives the refusal stored in ``notes["naughty"]`` at the configured stage."""

    def register(self, *args: str) -> None:
        words = list(args)
        if words[:1] == ["reject"]:
            words = words[1:]
        if len(words) > 1 or (words and words[0] not in STAGES):
            raise ValueError(f"naughty: reject must be one of {'|'.join(STAGES)}, not {args!r}")
        self.stage = STAGES.index(words[0]) if words else STAGES.index("rcpt")

    def hook_connect(self, transaction: Any) -> Any:
        return self._act(transaction, "connect")

    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        return self._act(transaction, "mail")

    def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> Any:
        return self._act(transaction, "rcpt")

    def hook_data(self, transaction: Any) -> Any:
        return self._act(transaction, "data")

    def hook_data_post(self, transaction: Any) -> Any:
        return self._act(transaction, "data_post")

    def _act(self, transaction: Any, stage: str) -> tuple[Result, str] | None:
        if STAGES.index(stage) < self.stage:
            return None
        mark = naughty_mark(transaction)
        if mark is None or transaction.connection.auth_user:
            return None  # a client that authenticated is not judged by its address
        temporary = bool(mark.get("temporary"))
        if mark.get("disconnect"):
            kind = DENYSOFT_DISCONNECT if temporary else DENY_DISCONNECT
        else:
            kind = DENYSOFT if temporary else DENY
        if not mark.get("acted"):
            mark["acted"] = True
            record(
                transaction,
                self.name,
                "fail",
                f"marked by {mark.get('plugin')} at {mark.get('stage') or '?'}",
                stage=stage,
                action="tempfail" if temporary else "reject",
            )
        message = str(mark.get("message") or "5.7.1 Your mail is not welcome here")
        return kind, with_class(message, "4" if temporary else "5")
