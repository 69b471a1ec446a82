"""XCLIENT (Postfix's extension), one part of SMTPCommands: a trusted proxy names the client.

A front proxy (nginx's mail module, a filtering hop, a test tool) connects to us on behalf
of the real client; without help every decision would be made on the proxy's address.
With ``XCLIENT ADDR=192.0.2.7 NAME=mail.example.org HELO=mail.example.org`` it hands over
the client's facts, and from the reply on the session is the client's, as if it had
connected directly (http://www.postfix.org/XCLIENT_README.html):

* Only peers listed in ``xclient_hosts`` (addresses, networks, prefixes, as
  ``relayclients``) may use it and see ``XCLIENT`` in the EHLO reply; everyone else gets
  ``550 5.7.0``. The address checked is the one the proxy connected from (after a PROXY
  header, the one that header gave), for every XCLIENT of the session: a proxy may split
  its facts over several commands without the first one taking its authorization away.
* Outside a transaction only (the session core answers 503 between MAIL and the end of
  the message). Attributes: ``NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT``, values
  xtext (RFC 3461 §4), ``[UNAVAILABLE]`` for "not known" (and ``[TEMPUNAVAIL]`` for a
  NAME whose lookup failed temporarily). An unknown attribute or a malformed value is
  ``501 5.5.4`` and changes nothing.
* The reply is a new greeting (220) and the session starts over, as Postfix does: a new
  :class:`~qpconn.mail.connection.Connection` (same id, for the logs) with the client's
  facts, fresh notes, ``relay_client`` unset, no HELO/EHLO accepted (the client sends
  EHLO again) and no AUTH; then the ``pre-connection`` and ``connect`` hooks run again,
  for the new client, and their verdict is the reply (a refusal closes the session, as
  at connect). Attributes a command does not give keep what an earlier XCLIENT gave.
* ``NAME`` is what the peer lookups would have found: a name is ``remote_host`` as a
  verified (FCrDNS) name, ``[UNAVAILABLE]`` no name (``rdns_error`` ``nxdomain``),
  ``[TEMPUNAVAIL]`` no name for now (``rdns_error`` ``error``, temporary for ``fcrdns``).
  A new ``ADDR`` without ``NAME`` runs the server's own lookups (rDNS, ident) again.
  ``HELO`` fills ``hello_host`` (``PROTO`` ``ESMTP``/``SMTP`` its ``hello`` kind) until the
  client's next HELO/EHLO replaces it; ``LOGIN`` is ``auth_user`` (the proxy
  authenticated the client); ``DESTADDR``/``DESTPORT`` our side of the client's connection.
  What the proxy said, and its own address, stay in ``connection.notes["xclient"]``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Any

from qpconn.core.reply import Reply
from qpconn.mail.connection import Connection
from qpconn.mail.dsn import DSNError, xtext_decode
from qpconn.smtp.context import CommandContext, HandlerResult

__all__ = [
    "XClientCommands",
    "XClientError",
    "ATTRIBUTES",
    "NOTE",
    "UNAVAILABLE",
    "TEMPUNAVAIL",
    "parse_xclient",
]

#: the attributes this server takes, in the order the EHLO keyword lists them
ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")
UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"
#: connection.notes key: {"peer": (proxy ip, port), "attributes": {name: value or None}}
NOTE = "xclient"
#: the notes that describe how the connection reached us, kept across the restart
_CARRIED_NOTES = ("proxy",)

_LABEL = re.compile(r"[a-z0-9_-]{1,63}\Z")
_PRINTABLE = re.compile(r"[!-~]{1,255}\Z")


class XClientError(ValueError):
    """A malformed XCLIENT argument; the message is safe to put in a 501 reply."""


def _hostname(value: str) -> str | None:
    """``value`` lower-cased when it is a plain host name (as the rDNS lookups accept)."""
    name = value.lower().removesuffix(".")
    if not name or len(name) > 253 or not name.isascii():
        return None
    return name if all(_LABEL.match(label) for label in name.split(".")) else None


def _address(value: str) -> str:
    """ADDR/DESTADDR: IPv4, or IPv6 with Postfix's ``IPV6:`` prefix (accepted without)."""
    text = value[5:] if value[:5].upper() == "IPV6:" else value
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise XClientError("address expected") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)  # as the factory gives a mapped peer
    return str(address)


def _port(value: str) -> int:
    if not value.isdigit() or len(value) > 5 or int(value) > 65535:
        raise XClientError("port number expected")
    return int(value)


def _name(value: str) -> str:
    name = _hostname(value)
    if name is None:
        raise XClientError("host name expected")
    return name


def _proto(value: str) -> str:
    if value.upper() not in ("SMTP", "ESMTP"):
        raise XClientError("SMTP or ESMTP expected")
    return value.upper()


def _text(value: str) -> str:
    if not _PRINTABLE.match(value):
        raise XClientError("1 to 255 printable characters expected")
    return value


def _login(value: str) -> str:
    # xtext carries octets: a UTF-8 user name arrives as +HH escapes.
    try:
        text = value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise XClientError("UTF-8 expected") from None
    if not text or len(text) > 255 or not text.isprintable():
        raise XClientError("1 to 255 printable characters expected")
    return text


_CHECKS = {
    "NAME": _name,
    "ADDR": _address,
    "PORT": _port,
    "PROTO": _proto,
    "HELO": _text,
    "LOGIN": _login,
    "DESTADDR": _address,
    "DESTPORT": _port,
}


def parse_xclient(arg: str) -> dict[str, Any]:
    """The attributes of one XCLIENT argument: name -> value, None for ``[UNAVAILABLE]``.

    NAME may also be :data:`TEMPUNAVAIL`. Names are case-insensitive; a later repeat wins.
    Raises :class:`XClientError` for anything else, naming the attribute.
    """
    found: dict[str, Any] = {}
    for item in arg.split():
        raw_name, equals, raw_value = item.partition("=")
        name = raw_name.upper()
        if name not in _CHECKS:
            raise XClientError(f"Bad XCLIENT attribute name: {raw_name[:32]}")
        if not equals or not raw_value:
            raise XClientError(f"Bad {name} syntax: attribute=value expected")
        try:
            value = xtext_decode(raw_value)
        except DSNError as exc:
            raise XClientError(f"Bad {name} syntax: {exc}") from None
        if value == UNAVAILABLE or (name == "NAME" and value == TEMPUNAVAIL):
            found[name] = None if value == UNAVAILABLE else TEMPUNAVAIL
            continue
        try:
            found[name] = _CHECKS[name](value)
        except XClientError as exc:
            raise XClientError(f"Bad {name} syntax: {exc}") from None
    if not found:
        raise XClientError("Syntax: XCLIENT attribute=value ...")
    return found


class XClientCommands(CommandContext):
    """The handler; see the module docstring."""

    #: the connection as the proxy made it, kept from the first XCLIENT on
    _xclient_origin: Connection | None = None
    #: every attribute given so far in this session (later commands add to it)
    _xclient_given: dict[str, Any] | None = None

    if TYPE_CHECKING:  # SMTPCommands' own, which this part ends in

        async def start_session(self) -> tuple[Reply, bool]: ...

    def xclient_allowed(self) -> bool:
        """May this peer use XCLIENT? Judged on the proxy's address, not a claimed one."""
        origin = self._xclient_origin or self.connection
        ip = origin.remote_ip
        return ip is not None and ip in self.factory.xclient_hosts

    def xclient_ehlo_lines(self) -> list[str]:
        """``XCLIENT NAME ADDR ...`` for authorized peers only: others need not know."""
        return ["XCLIENT " + " ".join(ATTRIBUTES)] if self.xclient_allowed() else []

    async def smtp_XCLIENT(self, arg: str) -> HandlerResult:
        """Take over the client's facts and start the session over; see the module docstring."""
        if not self.xclient_allowed():
            self.log.info(
                "{conn_id} XCLIENT refused: {remote_ip} is not in xclient_hosts",
                event="rejection",
                hook="xclient",
                code=550,
                result="rejected",
                **self.log_context(),
            )
            return Reply(550, "5.7.0 Error: insufficient authorization")
        try:
            attributes = parse_xclient(arg)
        except XClientError as exc:
            return Reply(501, f"5.5.4 {exc}")
        old = self.connection
        origin = self._xclient_origin = self._xclient_origin or old
        given = self._xclient_given = {**(self._xclient_given or {}), **attributes}
        self.connection = xclient_connection(origin, old, given)
        await self.reset_transaction()  # the new transaction belongs to the new connection
        if "ADDR" in given and "NAME" not in given:
            # The lookups' results for a claimed address (the factory caches rDNS answers,
            # so a proxy splitting its facts over several commands costs no extra query).
            await self.factory.lookup_peer(self.connection)
        conn = self.connection
        self.log.info(
            "{conn_id} XCLIENT from {proxy}: client {client}:{client_port} name={name}"
            " helo={helo} login={login}",
            proxy=origin.remote_ip,
            client=conn.remote_ip,
            client_port=conn.remote_port,
            name=conn.remote_host,
            helo=conn.hello_host,
            login=conn.auth_user,
            event="xclient",
            **self.log_context(),
        )
        reply, close = await self.start_session()
        # A refusal at connect ends the session, as it does for a first greeting.
        return reply, close or reply.code >= 400


def xclient_connection(
    origin: Connection, current: Connection, given: dict[str, Any]
) -> Connection:
    """The Connection of the session that starts after XCLIENT.

    The proxy's own facts (``origin``) are the base, overridden by every attribute
    ``given`` in this session; TLS, a property of the socket, comes from ``current``.
    Notes start empty but for how the connection reached us.
    """
    new = Connection()
    new.id = current.id
    new.remote_ip = origin.remote_ip
    new.remote_port = origin.remote_port
    new.local_ip = origin.local_ip
    new.local_port = origin.local_port
    new.tls = current.tls
    for key in _CARRIED_NOTES:
        if key in origin.notes:
            new.notes[key] = origin.notes[key]
    new.notes[NOTE] = {
        "peer": (origin.remote_ip, origin.remote_port),
        "attributes": dict(given),
    }
    if "ADDR" in given:
        new.remote_ip = given["ADDR"]
    else:  # the proxy's own lookups still describe the address
        new.remote_host = origin.remote_host
        new.remote_host_verified = origin.remote_host_verified
        new.remote_info = origin.remote_info
        if "rdns_error" in origin.notes:
            new.notes["rdns_error"] = origin.notes["rdns_error"]
    if "PORT" in given:
        new.remote_port = given["PORT"]
    if "NAME" in given:
        name = given["NAME"]
        new.remote_info = None
        if name is None:
            new.remote_host, new.remote_host_verified = None, False
            new.notes["rdns_error"] = "nxdomain"
        elif name == TEMPUNAVAIL:
            new.remote_host, new.remote_host_verified = None, False
            new.notes["rdns_error"] = "error"
        else:
            new.remote_host, new.remote_host_verified = name, True
            new.notes.pop("rdns_error", None)
    if "DESTADDR" in given:
        new.local_ip = given["DESTADDR"]
    if "DESTPORT" in given:
        new.local_port = given["DESTPORT"]
    if given.get("HELO") is not None:
        new.hello_host = given["HELO"]
        new.hello = "ehlo" if given.get("PROTO") == "ESMTP" else "helo"
    if given.get("LOGIN") is not None:
        new.auth_user = given["LOGIN"]
    return new
