"""SMTPUTF8 (RFC 6531/6532): internationalised addresses, their two forms, trace words.

The session core lets UTF-8 command lines through only when SMTPUTF8 is offered
(``Limits.utf8``); whether an address may *contain* UTF-8 is decided per transaction:
only after ``MAIL FROM:<...> SMTPUTF8``. Otherwise a UTF-8 address gets ``553 5.6.7``
(RFC 6531 §3.6.1). An :class:`~qpconn.mail.address.Address` keeps the domain as the client
wrote it (``host``, U-labels) and gives the A-label form (``host_ascii``) for DNS, for
domain lists and for next hops without SMTPUTF8; :func:`a_label` puts configured names
in the same form so that ``bücher.example`` and ``xn--bcher-kva.example`` match either way.

Pure Python: no Twisted here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qpconn.config import Config, ConfigError
from qpconn.mail.address import Address, AddressError

if TYPE_CHECKING:
    from qpconn.mail.connection import Connection
    from qpconn.mail.transaction import Transaction

__all__ = [
    "a_label",
    "address_a_label",
    "needs_smtputf8",
    "received_protocol",
    "is_smtputf8",
    "smtputf8_offered",
]

_ON = frozenset({"1", "yes", "true", "on"})
_OFF = frozenset({"0", "no", "false", "off"})


def smtputf8_offered(config: Config) -> bool:
    """The ``smtputf8`` setting (default on): whether SMTPUTF8 is offered at all.

    Off is for a server whose mail goes on to systems that cannot take UTF-8 addresses
    and that wants clients to hear so at MAIL (``555``) rather than after the message.
    A value that is not a yes/no word stops the server (ConfigError), as a typo must not
    silently change what is offered.
    """
    value = config.get("smtputf8")
    if value is None or value.lower() in _ON:
        return True
    if value.lower() in _OFF:
        return False
    raise ConfigError(f"smtputf8: {value!r} is not yes or no (1/0)")


def a_label(domain: str) -> str:
    """A domain name in lower-case A-label form, for comparing (unchanged if not valid)."""
    name = domain.rstrip(".").lower()
    prefix = "." if name.startswith(".") else ""
    bare = name[len(prefix) :]
    if bare.isascii():
        return name
    try:
        return prefix + (Address("x", bare).host_ascii or bare).lower()
    except AddressError:
        return name


def address_a_label(address: Address) -> str | None:
    """The host of an address in lower-case A-label form (None without a host)."""
    if address.host is None:
        return None
    try:
        return (address.host_ascii or address.host).lower().rstrip(".")
    except AddressError:
        return address.host.lower().rstrip(".")


def is_smtputf8(transaction: Transaction) -> bool:
    """The transaction's MAIL carried the SMTPUTF8 parameter."""
    return transaction.smtputf8


def needs_smtputf8(transaction: Transaction) -> bool:
    """True when the message cannot travel without SMTPUTF8 even with A-label domains.

    That is a UTF-8 local part in the envelope, or 8-bit octets in the header
    (RFC 6532 UTF-8 header fields). UTF-8 domains alone can be sent as A-labels.
    """
    people = [transaction.sender, *transaction.recipients]
    for address in people:
        if address is not None and address.user is not None and not address.user.isascii():
            return True
    header = transaction.header
    return header is not None and not header.as_bytes().isascii()


def ascii_path(address: Address) -> str:
    """``<user@a-label-host>``: the path for a next hop without SMTPUTF8."""
    if address.user is None:
        return "<>"
    host = address.host_ascii
    if host == address.host:  # None, or already ASCII: the path as it is
        return address.format()
    return Address(address.user, host).format()


def received_protocol(connection: Connection, transaction: Transaction, lmtp: bool) -> str:
    """The Received ``with`` word: RFC 3848's (E)SMTP/LMTP + S + A, UTF8 per RFC 6531 §4.3."""
    word = "LMTP" if lmtp else ("ESMTP" if connection.hello == "ehlo" else "SMTP")
    if is_smtputf8(transaction):
        word = "UTF8" + ("LMTP" if lmtp else "SMTP")
    if connection.tls:
        word += "S"
    if connection.auth_user:
        word += "A"
    return word
