"""The Received trace field (RFC 5321 §4.4) built from what the Connection knows.

Every name that came from the network (HELO argument, PTR name, ident reply) is
sanitised here before it can reach a header, since a hostile peer controls all three.
"""

from __future__ import annotations

import email.utils
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qpconn.connection import Connection
    from qpconn.transaction import Transaction

__all__ = ["received_value", "protocol_word", "header_safe"]

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def header_safe(text: str, limit: int = 255) -> str:
    """Printable ASCII without spaces or parentheses, bounded in length."""
    cleaned = _UNSAFE.sub("?", text)[:limit]
    return cleaned.replace("(", "?").replace(")", "?")


def protocol_word(connection: Connection) -> str:
    """SMTP, ESMTP, and the S (TLS) and A (AUTH) suffixes of RFC 3848."""
    word = "ESMTP" if connection.hello == "ehlo" else "SMTP"
    if connection.tls:
        word += "S"
    if connection.auth_user:
        word += "A"
    return word


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
    date = email.utils.formatdate(localtime=True)
    if len(transaction.recipients) == 1:
        lines.append(f"for {transaction.recipients[0].format()}; {date}")
    else:
        lines[-1] += ";"
        lines.append(date)
    return "\n\t".join(lines)
