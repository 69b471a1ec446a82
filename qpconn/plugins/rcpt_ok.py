"""rcpt_ok: accept recipients in our own domains; refuse the rest unless the client relays.

Local domains are ``me`` plus ``rcpthosts`` and ``morercpthosts``: exact names, or
``.example.com`` for every subdomain of example.com. ``<postmaster>`` without a domain is
always accepted (RFC 5321 §4.5.1). Internationalised names match in either form (U-label
or A-label) on either side. An address literal counts as local only when it is one
of our own listening addresses. Everything else is 550 5.7.1 unless
``connection.relay_client`` is set or the client authenticated (``connection.auth_user``,
set by a successful AUTH).
"""

from __future__ import annotations

from typing import Any

from qpconn.hooks.results import DENY, OK, Result
from qpconn.mail.address import Address
from qpconn.mail.smtputf8 import a_label, address_a_label
from qpconn.plugins import Plugin


class RcptOk(Plugin):
    """The relay check every server needs: our domains, or a client allowed to relay."""

    def register(self) -> None:
        names = [
            self.config.me,
            *self.config.lines("rcpthosts"),
            *self.config.lines("morercpthosts"),
        ]
        # Compared in A-label form (RFC 6531): bücher.example matches xn--bcher-kva.example.
        self.exact = {a_label(name) for name in names if not name.startswith(".")}
        self.suffixes = tuple(a_label(name) for name in names if name.startswith("."))

    def is_local(self, address: Address, local_ip: str | None) -> bool:
        """True for a domain we receive mail for (or a literal of the address we listen on)."""
        if address.is_postmaster:
            return True
        if address.host is None:
            return False
        if address.is_ip_literal:
            return address.ip is not None and local_ip is not None and str(address.ip) == local_ip
        domain = address_a_label(address) or ""
        if domain in self.exact:
            return True
        return bool(self.suffixes) and domain.endswith(self.suffixes)

    def hook_rcpt(
        self, transaction: Any, recipient: Address, params: dict[str, Any]
    ) -> Result | tuple[Result, str]:
        connection = transaction.connection
        if self.is_local(recipient, connection.local_ip):
            return OK
        if connection.relay_client or connection.auth_user:
            return OK
        return DENY, "5.7.1 Relaying denied"
