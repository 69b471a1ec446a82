"""auth/flat_file: AUTH against a file of salted password hashes (qpsmtpd's auth_flat_file).

Each line of the password file is ``user:HASH`` or ``user:HASH:CRAM-SECRET``. ``HASH`` is
``scrypt$LOG2N$R$P$SALT$KEY`` (salt and key in base64), as made by
``python -m qpconn.plugins.auth.flat_file USER`` (the password is read from standard
input). Plain text passwords are refused at load time: a stolen file must not hand out
the passwords it guards.

The trade-off of CRAM-MD5: the server must compute HMAC-MD5 with the password itself, so
a salted hash cannot serve it. A user who should be able to use CRAM-MD5 needs the third
field, the secret in clear text (a password equivalent: keep the file mode 0600, or leave
the field out and offer only PLAIN and LOGIN, which are sent inside TLS anyway). EHLO
offers CRAM-MD5 only when at least one line has a secret.

The file is the plugin's argument (``auth/flat_file /etc/qpconn/passwords``); without
one, the lines of the config setting ``flat_auth_pw`` are used. A user not in the file is
DECLINED, so a later ``auth`` plugin may know them; a wrong password is DENY (535 5.7.8).
Hashes are checked in a thread: scrypt is meant to be slow, and the reactor is not.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import threads

from qpconn.core.sasl import Credentials, cram_md5_matches
from qpconn.hooks.results import DECLINED, DENY, OK, Result
from qpconn.plugins import Plugin

__all__ = ["FlatFile", "hash_password", "verify_password"]

#: scrypt cost: 2**14 (16 MiB of memory, some tens of milliseconds per check)
LOG2N, R, P = 14, 8, 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, log2n: int = LOG2N, r: int = R, p: int = P) -> str:
    """A new salted hash of ``password``, in the file's ``scrypt$...`` form."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=1 << log2n, r=r, p=p, dklen=32)
    return f"scrypt${log2n}${r}${p}${_b64(salt)}${_b64(key)}"


@dataclass(frozen=True)
class _Hash:
    log2n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @classmethod
    def parse(cls, text: str) -> _Hash:
        parts = text.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("not a scrypt$LOG2N$R$P$SALT$KEY hash (plain text is refused)")
        try:
            log2n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt = base64.b64decode(parts[4], validate=True)
            key = base64.b64decode(parts[5], validate=True)
        except (ValueError, binascii.Error):
            raise ValueError("malformed scrypt hash") from None
        if not (1 <= log2n <= 20 and 1 <= r <= 32 and 1 <= p <= 16 and salt and key):
            raise ValueError("scrypt parameters out of range")
        return cls(log2n, r, p, salt, key)

    def matches(self, password: str) -> bool:
        key = hashlib.scrypt(
            password.encode("utf-8"),
            salt=self.salt,
            n=1 << self.log2n,
            r=self.r,
            p=self.p,
            maxmem=(1 << self.log2n) * self.r * 256,
            dklen=len(self.key),
        )
        return hmac.compare_digest(key, self.key)


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches a ``scrypt$...`` hash (constant-time compare)."""
    return _Hash.parse(stored).matches(password)


@dataclass(frozen=True)
class _Entry:
    hash: _Hash
    cram_secret: str | None = field(default=None, repr=False)


def parse_lines(lines: list[str], source: str) -> dict[str, _Entry]:
    """The users of a password file; a malformed line is a ValueError naming it."""
    users: dict[str, _Entry] = {}
    for number, line in enumerate(lines, 1):
        user, sep, rest = line.partition(":")
        stored, _, secret = rest.partition(":")
        if not sep or not user:
            raise ValueError(f"{source} line {number}: expected user:HASH[:CRAM-SECRET]")
        try:
            parsed = _Hash.parse(stored)
        except ValueError as exc:
            raise ValueError(f"{source} line {number} ({user}): {exc}") from None
        users[user] = _Entry(parsed, secret or None)
    return users


def _read(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [s for s in (raw.strip() for raw in handle) if s and not s.startswith("#")]


class FlatFile(Plugin):
    """PLAIN, LOGIN (and CRAM-MD5 for users with a secret) from a password file."""

    #: CRAM-MD5 only when some user has a CRAM secret (see register)
    registers_hooks = ("auth-cram-md5",)

    #: spent on unknown users too, so timing does not tell which users exist
    _dummy = _Hash.parse(
        "scrypt$14$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    )

    def register(self, *args: str) -> None:
        if len(args) > 1:
            raise ValueError("auth/flat_file takes one argument, the password file")
        if args:
            path = self.config.path(args[0])
            self.users = parse_lines(_read(path), path)
        else:
            self.users = parse_lines(self.config.lines("flat_auth_pw"), "flat_auth_pw")
        if any(entry.cram_secret for entry in self.users.values()):
            self.register_hook("auth-cram-md5", self.check_cram_md5)

    async def hook_auth_plain(
        self, transaction: Any, mechanism: str, user: str, password: str | None, *rest: Any
    ) -> Result:
        entry = self.users.get(user)
        hashed = entry.hash if entry is not None else self._dummy
        matched = await threads.deferToThread(hashed.matches, password or "")
        if entry is None:
            return DECLINED
        return OK if matched else DENY

    hook_auth_login = hook_auth_plain

    def check_cram_md5(
        self,
        transaction: Any,
        mechanism: str,
        user: str,
        password: str | None,
        response: str | None,
        ticket: str | None,
    ) -> Result:
        entry = self.users.get(user)
        if entry is None or entry.cram_secret is None:
            return DECLINED
        credentials = Credentials(mechanism, user, response=response, ticket=ticket)
        return OK if cram_md5_matches(entry.cram_secret, credentials) else DENY


plugin_class = FlatFile


def main(argv: list[str]) -> int:
    """``python -m qpconn.plugins.auth.flat_file USER``: print a line for the file."""
    if len(argv) != 1 or ":" in argv[0]:
        print("usage: python -m qpconn.plugins.auth.flat_file USER  (password on stdin)")
        return 2
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("no password on standard input", file=sys.stderr)
        return 1
    print(f"{argv[0]}:{hash_password(password)}")
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in tests
    raise SystemExit(main(sys.argv[1:]))
