"""SASL for SMTP AUTH (RFC 4954): the PLAIN, LOGIN and CRAM-MD5 exchanges, without I/O.

An :class:`Exchange` turns the client's base64 lines into :class:`Credentials` (or the
next challenge); the command handler (:mod:`qpconn.smtp.security`) runs the ``auth``
hooks with them. Nothing here checks a password: that is what plugins are for.

Nothing here logs, and :class:`Credentials` hides the password and the CRAM-MD5 response
from ``repr``: the only way a secret reaches a log is for someone to print it on purpose.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

__all__ = [
    "MECHANISMS",
    "Credentials",
    "Exchange",
    "SaslFailure",
    "challenge_text",
    "cram_md5_matches",
    "start",
]

#: The mechanisms the server implements, in the order EHLO lists them.
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


class SaslFailure(Exception):
    """The exchange ends with this reply (code, text) and no hook runs."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text


CANCELLED = SaslFailure(501, "5.0.0 Authentication cancelled")
BAD_BASE64 = SaslFailure(501, "5.5.2 Cannot decode response")


@dataclass(frozen=True)
class Credentials:
    """What the client proved it knows, as the ``auth`` hooks receive it (qpsmtpd's order).

    PLAIN and LOGIN give ``password``; CRAM-MD5 gives ``response`` (the hex HMAC-MD5 the
    client computed) and ``ticket`` (the challenge it was computed over).
    """

    mechanism: str
    user: str
    password: str | None = field(default=None, repr=False)
    response: str | None = field(default=None, repr=False)
    ticket: str | None = None


def decode(data: str) -> bytes:
    """A client's base64 line (``*`` cancels, as RFC 4954 §4 says)."""
    if data == "*":
        raise CANCELLED
    try:
        return base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise BAD_BASE64 from None


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslFailure(501, "5.5.2 Credentials are not UTF-8") from None


class Exchange:
    """One AUTH exchange. :meth:`step` takes the client's line, gives a challenge or the end.

    A challenge is the raw bytes to send base64-encoded in a ``334`` reply; the end is the
    :class:`Credentials`. Either may raise :class:`SaslFailure`.
    """

    mechanism = ""

    def first(self, initial: str | None) -> bytes | Credentials:
        """The reply to the AUTH command itself, given its initial response (if any)."""
        raise NotImplementedError

    def step(self, data: str) -> bytes | Credentials:
        """The reply to one response line."""
        raise NotImplementedError


class Plain(Exchange):
    """RFC 4616: ``[authzid] NUL authcid NUL passwd`` in one response."""

    mechanism = "PLAIN"

    def first(self, initial: str | None) -> bytes | Credentials:
        if initial is None:
            return b""  # "334 ": send the response
        return self.step(initial)

    def step(self, data: str) -> bytes | Credentials:
        raw = b"" if data == "=" else decode(data)
        parts = raw.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise SaslFailure(501, "5.5.2 Malformed PLAIN response")
        authzid, user, password = (_text(part) for part in parts)
        if authzid and authzid != user:
            # Acting for someone else is not something any plugin here can judge.
            raise SaslFailure(535, "5.7.8 Authorization identity not permitted")
        return Credentials(self.mechanism, user, password=password)


class Login(Exchange):
    """The de-facto LOGIN mechanism: user name, then password, each asked for in turn."""

    mechanism = "LOGIN"

    def __init__(self) -> None:
        self.user: str | None = None

    def first(self, initial: str | None) -> bytes | Credentials:
        if initial is None:
            return b"Username:"
        return self.step(initial)

    def step(self, data: str) -> bytes | Credentials:
        value = _text(decode(data))
        if self.user is None:
            if not value:
                raise SaslFailure(501, "5.5.2 Empty user name")
            self.user = value
            return b"Password:"
        return Credentials(self.mechanism, self.user, password=value)


class CramMD5(Exchange):
    """RFC 2195: HMAC-MD5 over a one-time challenge; the password never crosses the wire."""

    mechanism = "CRAM-MD5"

    def __init__(self, me: str) -> None:
        self.ticket = f"<{secrets.randbelow(10**12)}.{int(time.time())}@{me}>"

    def first(self, initial: str | None) -> bytes | Credentials:
        if initial is not None:
            raise SaslFailure(501, "5.5.2 CRAM-MD5 takes no initial response")
        return self.ticket.encode("ascii", "replace")

    def step(self, data: str) -> bytes | Credentials:
        user, _, digest = _text(decode(data)).rpartition(" ")
        if not user or len(digest) != 32:
            raise SaslFailure(501, "5.5.2 Malformed CRAM-MD5 response")
        return Credentials(self.mechanism, user, response=digest.lower(), ticket=self.ticket)


def start(mechanism: str, me: str) -> Exchange:
    """A new exchange for an (upper-case) mechanism from :data:`MECHANISMS`."""
    if mechanism == "PLAIN":
        return Plain()
    if mechanism == "LOGIN":
        return Login()
    if mechanism == "CRAM-MD5":
        return CramMD5(me)
    raise SaslFailure(504, "5.5.4 Unrecognized authentication type")


def challenge_text(challenge: bytes) -> str:
    """The text of a 334 reply: the challenge in base64 (empty for an empty challenge)."""
    return base64.b64encode(challenge).decode("ascii")


def cram_md5_matches(secret: str, credentials: Credentials) -> bool:
    """True when a CRAM-MD5 response was computed with ``secret`` (constant-time compare)."""
    if credentials.response is None or credentials.ticket is None:
        return False
    expected = hmac.new(
        secret.encode("utf-8"), credentials.ticket.encode("ascii", "replace"), hashlib.md5
    ).hexdigest()
    return hmac.compare_digest(expected, credentials.response)
