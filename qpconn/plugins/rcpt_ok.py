"""rcpt_ok: accept recipients in our own domains; refuse the rest unless the client relays.

Local domains are ``me`` plus ``rcpthosts`` and ``morercpthosts``: exact names, or
``.example.com`` for every subdomain of example.com. ``<postmaster>`` without a domain is
always accepted (RFC 5321 §4.5.1). Internationalised names match in either form (U-label
or A-label) on either side. An address literal counts as local only when it is one
of our own listening addresses. Everything else is 550 5.7.1 unless
``connection.relay_client`` is set or the client authenticated (``connection.auth_user``,
set by a successful AUTH).

A local recipient whose local part holds ``%``, ``!`` or (quoted) ``@`` names another
destination inside it: the percent hack (``victim%example.org@local``), a UUCP bang path
(``example.org!victim@local``) or a quoted mailbox (``"victim@example.org"@local``). We
store such mail under that literal mailbox, but a next hop behind ``queue/smtp-forward``
(or a local delivery agent) that still honours the old routing would hand it on: an open
relay one hop away. So, as Postfix does by default (``allow_untrusted_routing = no``),
such recipients are refused with ``554 5.7.1 <address>: Relay access denied`` to clients
that may not relay anyway; the config file ``allow_untrusted_routing`` (``1``) lifts that.
"""

from __future__ import annotations

from typing import Any

from qpconn.config import Config, ConfigError
from qpconn.hooks.results import DENY, DONE, OK, Result
from qpconn.mail.address import Address
from qpconn.mail.smtputf8 import a_label, address_a_label
from qpconn.plugins import Plugin

__all__ = ["RcptOk", "ROUTING_CHARACTERS", "has_sender_routing", "untrusted_routing_allowed"]

#: Local-part characters by which a sender names a further destination: the percent hack,
#: the UUCP bang path and an ``@`` (only possible inside a quoted local part).
ROUTING_CHARACTERS = frozenset("%!@")

_YES = frozenset({"1", "yes", "true", "on"})
_NO = frozenset({"0", "no", "false", "off"})


def has_sender_routing(address: Address) -> bool:
    """True when the local part of ``address`` carries a route to somewhere else.

    Only the characters matter, not whether what follows them is a real domain: a next
    hop that honours the hack does not check either.
    """
    user = address.user
    return address.host is not None and user is not None and not ROUTING_CHARACTERS.isdisjoint(user)


def untrusted_routing_allowed(config: Config) -> bool:
    """The ``allow_untrusted_routing`` setting (default off).

    A value that is not a yes/no word stops the server (a ConfigError at load time): a
    typo must not silently open a relay, nor silently close one a site depends on.
    """
    value = config.get("allow_untrusted_routing")
    if value is None or value.lower() in _NO:
        return False
    if value.lower() in _YES:
        return True
    raise ConfigError(f"allow_untrusted_routing: {value!r} is not 1 or 0 (yes/no)")


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
        self.allow_untrusted_routing = untrusted_routing_allowed(self.config)

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
        trusted = connection.relay_client or connection.auth_user
        if self.is_local(recipient, connection.local_ip):
            if trusted or self.allow_untrusted_routing or not has_sender_routing(recipient):
                return OK
            # 554 and Postfix's words, so that a client (and a log reader) sees the same
            # refusal from either server.
            return DONE, f"554 5.7.1 {recipient.format()}: Relay access denied"
        if trusted:
            return OK
        return DENY, "5.7.1 Relaying denied"
