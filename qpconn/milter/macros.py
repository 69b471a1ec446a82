"""The values of the Sendmail macros milters read, from qpconn's Connection and Transaction.

Milters learn most of what they know about a session from macros: OpenDKIM takes its
authserv-id from ``j`` and signs when ``{auth_authen}`` is set, rspamd logs the queue id
``i`` and reads the client from ``{client_addr}``/``{client_name}``. The names and the
meaning of each are Sendmail's, as Postfix fills them in:

=================== =========================================================
``j``               the server's name (``me``)
``{daemon_name}``   the same (Postfix's ``milter_macro_daemon_name`` default)
``{daemon_addr}``   the address the client connected to; ``{daemon_port}`` its port
``v``               ``qpconn VERSION``
``_``               ``NAME [ADDRESS]`` of the client (``unknown`` without a verified name)
``{client_addr}``   the client's address; ``{client_port}`` its port
``{client_name}``   its verified host name (forward-confirmed), else ``unknown``
``{client_ptr}``    the name reverse DNS gave, verified or not, else ``unknown``
``{tls_version}``   ``TLSv1.3`` ... once encrypted; ``{cipher}``, ``{cipher_bits}``
``i``               the queue id (``transaction.id``)
``{auth_type}``     the AUTH mechanism; ``{auth_authen}`` the authenticated user
``{mail_addr}``     the sender without brackets (empty for ``<>``); ``{mail_host}`` its
                    domain; ``{mail_mailer}`` ``smtp`` (``local`` for ``<>``)
``{rcpt_addr}``     the recipient without brackets; ``{rcpt_host}`` its domain;
                    ``{rcpt_mailer}`` ``local`` for our own domains, else ``smtp``
=================== =========================================================

A macro without a value (no TLS, no AUTH) is not sent at all: milters tell "not
authenticated" by the absence of ``{auth_authen}``.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import qpconn

__all__ = ["connect_macros", "helo_macros", "mail_macros", "rcpt_macros", "message_macros"]

MacroValues = dict[str, str | None]


def client_name(connection: Any) -> str:
    """The verified name of the client, or ``unknown``."""
    if connection.remote_host and connection.remote_host_verified:
        return str(connection.remote_host)
    return "unknown"


def connect_macros(connection: Any, me: str) -> MacroValues:
    """The connect stage's macros. Every later stage has these too, for a milter that asks
    for ``{client_addr}`` at the end of the message."""
    address = connection.remote_ip
    name = client_name(connection)
    return {
        "j": me,
        "{daemon_name}": me,
        "{daemon_addr}": connection.local_ip,
        "{daemon_port}": _text(connection.local_port),
        "{if_addr}": connection.local_ip,
        "v": f"qpconn {qpconn.__version__}",
        "_": f"{name} [{address or 'unix'}]",
        "{client_addr}": address,
        "{client_port}": _text(connection.remote_port),
        "{client_name}": name,
        "{client_ptr}": connection.remote_host or "unknown",
    }


def helo_macros(connection: Any) -> MacroValues:
    tls = connection.tls or {}
    return {
        "{tls_version}": tls.get("version"),
        "{cipher}": tls.get("cipher"),
        "{cipher_bits}": tls.get("bits"),
        "{cert_subject}": tls.get("subject"),
        "{cert_issuer}": tls.get("issuer"),
    }


def mail_macros(transaction: Any, sender: Any) -> MacroValues:
    connection = transaction.connection
    return {
        "i": transaction.id,
        "{auth_type}": connection.auth_mechanism,
        "{auth_authen}": connection.auth_user,
        "{auth_author}": None,
        "{mail_addr}": "" if sender.is_null else sender.address,
        "{mail_host}": sender.domain or None,
        "{mail_mailer}": "local" if sender.is_null else "smtp",
    }


def rcpt_macros(transaction: Any, recipient: Any, local_domains: Container[str]) -> MacroValues:
    domain = recipient.domain or ""
    return {
        "i": transaction.id,
        "{rcpt_addr}": recipient.address,
        "{rcpt_host}": domain or None,
        "{rcpt_mailer}": "local" if not domain or domain in local_domains else "smtp",
    }


def message_macros(transaction: Any) -> MacroValues:
    """DATA, end of header and end of message: the queue id."""
    return {"i": transaction.id}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
