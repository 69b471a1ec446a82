"""dont_require_anglebrackets: accept ``MAIL FROM:user@host`` from clients that omit ``<>``.

RFC 5321 requires the brackets and qpconn's parser insists on them; some old or broken
clients (printers, scripts) leave them out. At ``mail_pre`` and ``rcpt_pre`` this plugin
wraps a bare path in brackets (``MAIL FROM:a@b SIZE=10`` becomes ``<a@b> SIZE=10``) and
hands the rewritten argument back (``OK`` with the new text), so every later check sees
an ordinary address. An empty path stays empty (it is still a syntax error). No arguments.
"""

from __future__ import annotations

from typing import Any

from qpconn.hooks.results import OK
from qpconn.hooks.verdicts import record
from qpconn.plugins import Plugin


def bracketed(arg: str) -> str | None:
    """``arg`` with its path wrapped in ``<>``, or None when nothing needs changing."""
    text = arg.lstrip(" ")
    if not text or text.startswith("<"):
        return None
    path, _, params = text.partition(" ")
    return f"<{path}> {params}".rstrip(" ") if params else f"<{path}>"


class DontRequireAnglebrackets(Plugin):
    """Rewrites bare MAIL/RCPT paths before they are parsed."""

    def hook_mail_pre(self, transaction: Any, arg: str) -> Any:
        return self._rewrite(transaction, arg, "mail_pre")

    def hook_rcpt_pre(self, transaction: Any, arg: str) -> Any:
        return self._rewrite(transaction, arg, "rcpt_pre")

    def _rewrite(self, transaction: Any, arg: str, stage: str) -> Any:
        rewritten = bracketed(arg)
        if rewritten is None:
            return None
        record(transaction, self.name, "pass", "added angle brackets", stage=stage)
        return OK, rewritten
