"""One ``Authentication-Results`` header (RFC 8601) shared by the SPF, DKIM and DMARC plugins.

Each authentication plugin records its results in ``transaction.notes["auth_results"]``
(a list of :class:`AuthResult`) and then calls :func:`write_header`, which replaces the
field it wrote before. So the message carries exactly one field from us, combining every
method that ran, whatever order the plugins are listed in and whichever of them runs
last; there is no "writer" plugin to forget to configure.

:func:`write_header` also removes incoming fields that carry our own authserv-id: a
sender could otherwise forge ``spf=pass`` in our name for the filters downstream that
trust our results (RFC 8601 §5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AuthResult", "NOTE", "record", "results", "header_value", "write_header"]

#: transaction.notes key holding the list of AuthResult
NOTE = "auth_results"
FIELD = "Authentication-Results"

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+\Z")
_PVALUE = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~/=]*@?[A-Za-z0-9.\-]+\Z")


@dataclass(frozen=True)
class AuthResult:
    """One ``method=result`` of the header: ``spf=pass smtp.mailfrom=a@example.org``."""

    method: str
    result: str
    #: free text, written as ``reason="..."``
    reason: str | None = None
    #: ``{"smtp.mailfrom": "a@example.org", "header.d": "example.org"}``
    props: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        parts = [f"{self.method}={self.result}"]
        if self.reason:
            parts.append(f"reason={quote(self.reason)}")
        for key, value in self.props.items():
            parts.append(f"{key}={pvalue(value)}")
        return " ".join(parts)


def quote(text: str) -> str:
    """An RFC 5322 quoted-string of ``text`` (control characters and non-ASCII dropped)."""
    clean = "".join(ch for ch in text if " " <= ch <= "~")
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pvalue(text: str) -> str:
    """A property value: bare when it is a token or a plain address, else quoted."""
    return text if text and (_TOKEN.match(text) or _PVALUE.match(text)) else quote(text)


def record(
    transaction: Any,
    method: str,
    result: str,
    reason: str | None = None,
    props: dict[str, str] | None = None,
    *,
    replace: bool = True,
) -> AuthResult:
    """Note one result; ``replace`` drops earlier results of the same method first."""
    entry = AuthResult(method, result, reason, dict(props or {}))
    entries: list[AuthResult] = transaction.notes.setdefault(NOTE, [])
    if replace:
        entries[:] = [old for old in entries if old.method != method]
    entries.append(entry)
    return entry


def results(transaction: Any, method: str) -> list[AuthResult]:
    """The recorded results of one method, in the order they were recorded."""
    return [entry for entry in transaction.notes.get(NOTE, []) if entry.method == method]


def header_value(authserv_id: str, entries: list[AuthResult]) -> str:
    """The field value: the authserv-id, then one folded line per result."""
    if not entries:
        return f"{authserv_id}; none"
    return authserv_id + ";" + ";".join(f"\n\t{entry.text()}" for entry in entries)


def _authserv_id(value: str) -> str:
    return value.split(";", 1)[0].strip().split()[0].lower() if value.strip() else ""


def write_header(transaction: Any, authserv_id: str) -> None:
    """Put the one field with every recorded result on top of the header.

    Any field already carrying ``authserv_id`` goes first: the one we wrote earlier in
    this transaction, or one a sender forged in our name.
    """
    header = transaction.header
    if header is None:
        return
    ours = authserv_id.lower()
    header.delete_if(FIELD, lambda value: _authserv_id(value) == ours)
    header.add(FIELD, header_value(authserv_id, transaction.notes.get(NOTE, [])), index=0)
