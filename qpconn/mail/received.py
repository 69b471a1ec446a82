"""The Received trace field (RFC 5321 §4.4) built from what the Connection knows.

Every name that came from the network (HELO argument, PTR name, ident reply) is
sanitised here before it can reach a header, since a hostile peer controls all three.
"""

from __future__ import annotations

import email.utils
import re
import time
from typing import TYPE_CHECKING

from qpconn.mail.address import Address, AddressError
from qpconn.mail.smtputf8 import ascii_path

if TYPE_CHECKING:
    from qpconn.mail.connection import Connection
    from qpconn.mail.transaction import Transaction

__all__ = ["received_value", "protocol_word", "header_safe"]

_UNSAFE = re.compile(r"[^\x21-\x7e]")

# The date of the last Received field built: (whole second, its RFC 5322 text).
_date_memo: tuple[int, str] = (-1, "")


def _date(when: float | None = None) -> str:
    """``when`` (default now) as RFC 5322 local time, formatted once per second.

    The field has whole seconds only, so reusing the text within the same second gives
    the same bytes; formatting it (local time zone and all) cost about 4% of the CPU per
    message on a busy server.
    """
    global _date_memo
    second = int(time.time() if when is None else when)
    if _date_memo[0] != second:
        _date_memo = (second, email.utils.formatdate(second, localtime=True))
    return _date_memo[1]


def header_safe(text: str, limit: int = 255) -> str:
    """Printable ASCII without spaces or parentheses, bounded in length."""
    key = (text, limit)
    safe = _SAFE.get(key)
    if safe is None:
        # The same few HELO names and host names recur message after message.
        cleaned = _UNSAFE.sub("?", text)[:limit]
        safe = cleaned.replace("(", "?").replace(")", "?")
        if len(_SAFE) >= 1024:
            _SAFE.clear()
        _SAFE[key] = safe
    return safe


_SAFE: dict[tuple[str, int], str] = {}


def protocol_word(connection: Connection) -> str:
    """SMTP, ESMTP, and the S (TLS) and A (AUTH) suffixes of RFC 3848."""
    word = "ESMTP" if connection.hello == "ehlo" else "SMTP"
    if connection.tls:
        word += "S"
    if connection.auth_user:
        word += "A"
    return word


def _for_path(recipient: Address) -> str:
    """The ``for`` clause's path: A-labels where that loses nothing (RFC 6531 permits
    UTF-8 here, but an ASCII header lets the message go on to a next hop without SMTPUTF8).
    """
    if recipient.user is not None and recipient.user.isascii():
        try:
            return ascii_path(recipient)
        except AddressError:
            pass
    return recipient.format()


def received_value(
    connection: Connection,
    transaction: Transaction,
    me: str,
    software: str,
    with_word: str | None = None,
) -> str:
    """The Received field's value, folded over three lines as Postfix and sendmail write it."""
    helo = header_safe(connection.hello_host or "unknown")
    host = header_safe(connection.remote_host_or_unknown)
    if connection.remote_info:
        host = f"{header_safe(connection.remote_info, 64)}@{host}"
    ip = connection.remote_ip or "unix"
    if ":" in ip:
        ip = f"IPv6:{ip}"
    words = with_word or protocol_word(connection)
    if connection.tls and connection.tls.get("cipher"):
        tls = connection.tls
        words += f" ({header_safe(tls.get('version', 'TLS'))} cipher {header_safe(tls['cipher'])})"
    lines = [
        f"from {helo} ({host} [{ip}])",
        f"by {me} ({software}) with {words} id {transaction.id}",
    ]
    # The message's arrival, so a bounce's Arrival-Date (qpconn.client.dsn) says the same.
    date = _date(transaction.arrival_time)
    if len(transaction.recipients) == 1:
        lines.append(f"for {_for_path(transaction.recipients[0])}; {date}")
    else:
        lines[-1] += ";"
        lines.append(date)
    return "\n\t".join(lines)
