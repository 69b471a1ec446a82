"""Delivery Status Notification parameters (RFC 3461) on MAIL and RCPT, and xtext.

A client asks for DSNs with ``RET=FULL|HDRS`` and ``ENVID=<xtext>`` on MAIL and
``NOTIFY=NEVER|SUCCESS,FAILURE,DELAY`` and ``ORCPT=<addr-type>;<xtext>`` on RCPT. They are
checked here once (a malformed one is refused with 501 before any hook sees it), kept
raw in ``Transaction.mail_params`` and ``Recipient.params`` so they can be passed on
unchanged, and read decoded through :attr:`qpconn.mail.transaction.Transaction.dsn` and
:attr:`qpconn.mail.transaction.Recipient.dsn`.

``ORCPT`` with the ``utf-8`` address type (RFC 6533) may carry UTF-8 and ``\\x{HEX}``
escapes, but only in an SMTPUTF8 transaction.

Pure Python: no Twisted here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DSNError",
    "MailDSN",
    "RcptDSN",
    "xtext_decode",
    "xtext_encode",
    "check_mail_dsn",
    "check_rcpt_dsn",
    "mail_dsn",
    "rcpt_dsn",
    "NOTIFY_VALUES",
    "wants_failure_notice",
]

NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})
RET_VALUES = frozenset({"FULL", "HDRS"})
#: RFC 3461 §4.4: ENVID is at most 100 characters (as sent, xtext-encoded)
MAX_ENVID = 100
#: RFC 3461 §4.2: ORCPT is at most 500 characters (as sent)
MAX_ORCPT = 500

_XCHAR = re.compile(r"[!-*,-<>-~]")  # %d33-42 / %d44-60 / %d62-126: not "+" or "="
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-F]{2,6})\}")


class DSNError(ValueError):
    """A DSN parameter that is not valid; the message is safe to put in a 501 reply."""


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 §4 xtext; a bad character or ``+`` escape raises DSNError."""
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "+":
            match = _HEXCHAR.match(text, index)
            if match is None:
                raise DSNError("bad '+' escape in xtext (needs two upper-case hex digits)")
            out.append(chr(int(match.group(1), 16)))
            index += 3
            continue
        if not _XCHAR.fullmatch(char):
            raise DSNError("character not allowed in xtext")
        out.append(char)
        index += 1
    return "".join(out)


def xtext_encode(text: str) -> str:
    """Encode text as xtext: ``+``, ``=`` and everything outside ``!``..``~`` as ``+HH``.

    Only for ASCII text (ORCPT with a UTF-8 address uses the ``utf-8`` type instead).
    """
    return "".join(
        char if _XCHAR.fullmatch(char) else f"+{ord(char):02X}" for char in text
    )


def _utf8_addr_decode(text: str) -> str:
    """RFC 6533 utf-8-addr-xtext: UTF-8 as is, ``\\x{HEX}`` for the rest."""

    def unescape(match: re.Match[str]) -> str:
        point = int(match.group(1), 16)
        if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
            raise DSNError("bad \\x{} escape in ORCPT")
        return chr(point)

    decoded = _UTF8_ESCAPE.sub(unescape, text)
    if "\\" in _UTF8_ESCAPE.sub("", text):
        raise DSNError("bad \\x{} escape in ORCPT")
    for char in decoded:
        if ord(char) < 32 or ord(char) == 127:
            raise DSNError("control character in ORCPT")
    return decoded


@dataclass(frozen=True)
class MailDSN:
    """What MAIL asked for: ``ret`` (FULL, HDRS or None) and the decoded ``envid``."""

    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True)
class RcptDSN:
    """What RCPT asked for: ``notify`` (None: not given) and ``orcpt`` (type, address)."""

    notify: frozenset[str] | None = None
    orcpt: tuple[str, str] | None = None

    @property
    def never(self) -> bool:
        """NOTIFY=NEVER: no DSN of any kind for this recipient."""
        return self.notify == frozenset({"NEVER"})


def check_mail_dsn(params: dict[str, str | None]) -> MailDSN:
    """Validate RET and ENVID; raise DSNError for a malformed one."""
    ret = None
    if "RET" in params:
        value = params["RET"]
        if value is None or value.upper() not in RET_VALUES:
            raise DSNError("RET must be FULL or HDRS")
        ret = value.upper()
    envid = None
    if "ENVID" in params:
        raw = params["ENVID"]
        if not raw or len(raw) > MAX_ENVID:
            raise DSNError(f"ENVID must be 1 to {MAX_ENVID} characters of xtext")
        envid = xtext_decode(raw)
        if not all(" " <= char <= "~" for char in envid):
            raise DSNError("ENVID must decode to printable ASCII")
    return MailDSN(ret, envid)


def check_rcpt_dsn(params: dict[str, str | None], *, utf8: bool = False) -> RcptDSN:
    """Validate NOTIFY and ORCPT; raise DSNError for a malformed one.

    ``utf8``: the transaction is SMTPUTF8, so an ORCPT of type ``utf-8`` is allowed.
    """
    notify = None
    if "NOTIFY" in params:
        value = params["NOTIFY"]
        words = [word.upper() for word in (value or "").split(",")]
        if words == ["NEVER"]:
            notify = frozenset(words)
        elif "NEVER" in words:
            raise DSNError("NOTIFY=NEVER cannot be combined with other values")
        elif not words or not NOTIFY_VALUES.issuperset(words) or len(set(words)) != len(words):
            raise DSNError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
        else:
            notify = frozenset(words)
    orcpt = None
    if "ORCPT" in params:
        raw = params["ORCPT"] or ""
        kind, semicolon, value = raw.partition(";")
        if not semicolon or not _ATOM.fullmatch(kind) or not value or len(raw) > MAX_ORCPT:
            raise DSNError("ORCPT must be addr-type;xtext")
        if kind.lower() == "utf-8":
            if not utf8 and not value.isascii():
                raise DSNError("UTF-8 in ORCPT needs SMTPUTF8")
            address = _utf8_addr_decode(value)
        else:
            address = xtext_decode(value)
        orcpt = (kind, address)
    return RcptDSN(notify, orcpt)


def mail_dsn(params: dict[str, str | None]) -> MailDSN:
    """The DSN request of already-checked MAIL parameters (never raises: bad is absent)."""
    try:
        return check_mail_dsn(params)
    except DSNError:
        return MailDSN()


def rcpt_dsn(params: dict[str, str | None]) -> RcptDSN:
    """The DSN request of already-checked RCPT parameters (never raises: bad is absent)."""
    try:
        return check_rcpt_dsn(params, utf8=True)
    except DSNError:
        return RcptDSN()


def forward_mail_params(params: dict[str, str | None]) -> list[str]:
    """RET and ENVID as the client sent them, for a next hop that offers DSN."""
    return [f"{key}={params[key]}" for key in ("RET", "ENVID") if params.get(key)]


def forward_rcpt_params(params: dict[str, str | None]) -> list[str]:
    """NOTIFY and ORCPT as the client sent them, for a next hop that offers DSN."""
    return [f"{key}={params[key]}" for key in ("NOTIFY", "ORCPT") if params.get(key)]


def wants_failure_notice(transaction: Any, path: str) -> bool:
    """Whether the recipient written ``path`` (``<addr>`` as sent on) wants a failure DSN:
    yes unless its NOTIFY was given without FAILURE (NEVER, or SUCCESS/DELAY only)."""
    for rcpt in transaction.recipients:
        if rcpt.format() == path or rcpt.address == path.strip("<>"):
            notify = rcpt_dsn(rcpt.params).notify
            return notify is None or "FAILURE" in notify
    return True
