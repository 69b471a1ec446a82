"""RFC 5321 / RFC 6531 mail paths: parse the argument of MAIL FROM / RCPT TO, and format it back.

Relay control decides on the host this module returns, so the parser is strict on purpose:
an address is accepted only if it is exactly one mailbox under the RFC 5321 grammar, and the
host it yields is the one that mailbox literally names. The old open-relay tricks
("user%other@local", "other!user@local", '"user@other"@local', "<@local:user@other>") thus
come out as the mailboxes they really are, and "user@other@local" is refused outright.

Pure Python on purpose: the sans-I/O core and plugins use it without Twisted.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

__all__ = ["Address", "AddressError", "parse_params", "split_path_and_params"]

MAX_PATH_OCTETS = 256  # RFC 5321 4.5.3.1.3, counting the brackets

# Paths already parsed (class, text, flags) -> (user, host): senders and recipients repeat
# on a busy server, and a parse is a dozen regex and string steps. Only valid paths are
# kept (an invalid one is parsed again to raise its error); bounded, emptied when full.
_PARSED: dict[tuple[type, str, bool, bool], tuple[str | None, str | None]] = {}
_PARSED_MAX = 4096
#: (user, host) -> the mailbox as written on the wire (Address.address)
_WIRE: dict[tuple[str, str | None], str] = {}
MAX_LOCAL_OCTETS = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN_OCTETS = 255  # RFC 5321 4.5.3.1.2
MAX_LABEL_OCTETS = 63  # RFC 1035 2.3.4

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_NON_ASCII = "\x80-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}{_NON_ASCII}]+(?:\.[{_ATEXT}{_NON_ASCII}]+)*")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_UTF8_LABEL = re.compile(
    rf"[A-Za-z0-9{_NON_ASCII}](?:[A-Za-z0-9{_NON_ASCII}-]*[A-Za-z0-9{_NON_ASCII}])?"
)
# The "idna" codec treats these as dots too; a label holding one would name another domain
# once converted to A-labels than the one the relay check saw.
_IDNA_DOTS = frozenset("\u3002\uff0e\uff61")
_IPV4_TEXT = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
# Without this pre-check ipaddress would also accept a "%scope" suffix.
_IPV6_TEXT = re.compile(r"[0-9A-Fa-f:.]+")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[!-<>-~]+")  # %d33-60 / %d62-126
_VALUE_UTF8 = re.compile(rf"[!-<>-~{_NON_ASCII}]+")


class AddressError(ValueError):
    """A path or parameter list that is not valid RFC 5321 / 6531 syntax.

    ``utf8`` is True when the text would be valid had SMTPUTF8 been in force, because RFC 6531
    wants a different reply then (553 5.6.7 rather than 501). Messages never echo the input,
    so they are safe to put in an SMTP reply.
    """

    def __init__(self, message: str, *, utf8: bool = False) -> None:
        super().__init__(message)
        self.utf8 = utf8


class Address:
    """One mailbox from a reverse- or forward-path, or the null path ``<>``.

    The constructor does not validate, so that plugins can build addresses freely; anything
    that came from a client should go through :meth:`parse`. Equality compares the local part
    case-sensitively (RFC 5321 2.4 leaves its meaning to the receiving host) and the host
    case-insensitively. Address literals are compared as text; use :attr:`ip` to compare them
    by value.
    """

    __slots__ = ("host", "user")

    def __init__(self, user: str | None = None, host: str | None = None) -> None:
        if user is None and host is not None:
            raise ValueError("an Address with a host needs a user")
        self.user = user
        self.host = host

    @classmethod
    def parse(
        cls, text: str, *, allow_utf8: bool = False, require_brackets: bool = True
    ) -> Address:
        """Parse a path as it stands after ``MAIL FROM:`` / ``RCPT TO:``, parameters removed.

        A source route is checked and then dropped (RFC 5321 C: receivers SHOULD ignore it).
        ``require_brackets=False`` also takes a bare ``user@example.com`` for lax clients.
        """
        key = (cls, text, allow_utf8, require_brackets)
        known = _PARSED.get(key)
        if known is not None:
            return cls(*known)  # a fresh object: callers may change theirs
        if not allow_utf8 and not text.isascii():
            # Parse again with UTF-8 allowed so the caller learns whether non-ASCII text is the
            # only fault; that decides between 553 5.6.7 and 501.
            cls._parse(text, allow_utf8=True, require_brackets=require_brackets)
            raise AddressError("non-ASCII address without SMTPUTF8", utf8=True)
        address = cls._parse(text, allow_utf8=allow_utf8, require_brackets=require_brackets)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[key] = (address.user, address.host)
        return address

    @classmethod
    def _parse(cls, text: str, *, allow_utf8: bool, require_brackets: bool) -> Address:
        _check_characters(text)
        bracketed = text.startswith("<")
        if bracketed:
            if len(text) < 2 or not text.endswith(">"):
                raise AddressError("path lacks its closing '>'")
            inner = text[1:-1]
        elif require_brackets:
            raise AddressError("path must be enclosed in '<' and '>'")
        else:
            inner = text
        if len(text.encode()) + (0 if bracketed else 2) > MAX_PATH_OCTETS:
            raise AddressError("path longer than 256 octets")
        if not inner:
            if bracketed:
                return cls()
            raise AddressError("empty path")
        if inner.lower() == "postmaster":
            return cls(inner, None)
        if inner.startswith("@"):
            route, colon, inner = inner.partition(":")
            if not colon:
                raise AddressError("source route not ended by ':'")
            for hop in route.split(","):
                if not hop.startswith("@"):
                    raise AddressError("source route hop must be '@domain'")
                _parse_domain(hop[1:], allow_utf8=allow_utf8, literal_ok=False)
        user, domain = _parse_local_part(inner, allow_utf8=allow_utf8)
        return cls(user, _parse_domain(domain, allow_utf8=allow_utf8, literal_ok=True))

    @property
    def is_null(self) -> bool:
        return self.user is None

    @property
    def is_postmaster(self) -> bool:
        """True only for the domain-less ``<postmaster>`` that RFC 5321 4.5.1 says must work."""
        return self.host is None and self.user is not None and self.user.lower() == "postmaster"

    @property
    def address(self) -> str:
        """The mailbox as it goes on the wire, quoting the local part only where needed."""
        user = self.user
        if user is None:
            return ""
        key = (user, self.host)
        text = _WIRE.get(key)  # the same few addresses over and over
        if text is None:
            local = user if _DOT_STRING_UTF8.fullmatch(user) else _quote(user)
            text = local if self.host is None else f"{local}@{self.host}"
            if len(_WIRE) >= _PARSED_MAX:
                _WIRE.clear()
            _WIRE[key] = text
        return text

    def format(self) -> str:
        return f"<{self.address}>"

    @property
    def domain(self) -> str | None:
        """The host in the form to compare with configured domain lists."""
        return None if self.host is None else self.host.lower()

    @property
    def is_ip_literal(self) -> bool:
        return self.host is not None and self.host.startswith("[")

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The address of an address literal; None for domains and for malformed literals."""
        if not self.is_ip_literal:
            return None
        try:
            return _literal_ip(self.host or "")
        except AddressError:
            return None

    @property
    def host_ascii(self) -> str | None:
        """The host for DNS and for peers without SMTPUTF8: U-labels turned into A-labels.

        Raises AddressError for a non-ASCII host that did not come from :meth:`parse`
        and cannot be converted.
        """
        if self.host is None or self.host.isascii():
            return self.host
        return ".".join(_ascii_label(label, allow_utf8=True) for label in self.host.split("."))

    def __str__(self) -> str:
        return self.address

    def __repr__(self) -> str:
        return f"Address(user={self.user!r}, host={self.host!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Address):
            return NotImplemented
        return self.user == other.user and self.domain == other.domain

    def __hash__(self) -> int:
        return hash((self.user, self.domain))


def split_path_and_params(arg: str) -> tuple[str, str]:
    """Split what follows ``MAIL FROM:`` / ``RCPT TO:`` into path text and parameter text.

    Leading spaces are skipped because many clients send ``MAIL FROM: <a@b>``. This never
    raises: when the brackets or quotes do not close, the malformed text is left in the path
    so that :meth:`Address.parse` rejects it, instead of being silently read as parameters.
    """
    text = arg.lstrip(" ")
    if text.startswith("<"):
        end = _closing_bracket(text)
        if end is not None and text[end + 1 : end + 2] in ("", " "):
            return text[: end + 1], text[end + 1 :].lstrip(" ")
    path, _, params = text.partition(" ")
    return path, params.lstrip(" ")


def parse_params(text: str, *, allow_utf8: bool = False) -> dict[str, str | None]:
    """Parse RFC 5321 esmtp-params into ``{KEYWORD: value or None}``, keywords upper-cased.

    Runs of spaces between parameters are tolerated; anything else outside the grammar,
    including a repeated keyword, is refused so that a plugin never sees two answers.
    """
    if not text:
        return {}  # most commands carry no parameters
    if not allow_utf8 and not text.isascii():
        _parse_params(text, allow_utf8=True)
        raise AddressError("non-ASCII parameter value without SMTPUTF8", utf8=True)
    return _parse_params(text, allow_utf8=allow_utf8)


def _parse_params(text: str, *, allow_utf8: bool) -> dict[str, str | None]:
    _check_characters(text)
    value_pattern = _VALUE_UTF8 if allow_utf8 else _VALUE
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        keyword, equals, value = item.partition("=")
        if not _KEYWORD.fullmatch(keyword):
            raise AddressError("malformed parameter keyword")
        if equals and not value_pattern.fullmatch(value):
            raise AddressError(f"empty or malformed value for parameter {keyword.upper()}")
        if keyword.upper() in params:
            raise AddressError(f"parameter {keyword.upper()} given twice")
        params[keyword.upper()] = value if equals else None
    return params


def _check_characters(text: str) -> None:
    if text.isascii() and text.isprintable():
        return  # the common case, checked in C: no control character at all
    # Surrogates (from surrogateescape decoding) are refused here too: they cannot be encoded,
    # so the octet limits could not be checked.
    for char in text:
        code = ord(char)
        if code < 32 or code == 127 or (code > 127 and unicodedata.category(char) in ("Cc", "Cs")):
            raise AddressError(f"control character U+{code:04X} in address")


def _closing_bracket(text: str) -> int | None:
    """Index of the '>' that ends the path at text[0], skipping quoted strings."""
    if '"' not in text:
        end = text.find(">", 1)  # no quoted string: the first '>' is the one
        return end if end >= 0 else None
    quoted = False
    index = 1
    while index < len(text):
        char = text[index]
        if quoted and char == "\\":
            index += 1
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
        index += 1
    return None


def _parse_local_part(mailbox: str, *, allow_utf8: bool) -> tuple[str, str]:
    """Split a mailbox into its logical local part and the domain text after the '@'."""
    if mailbox.startswith('"'):
        chars: list[str] = []
        index = 1
        while True:
            if index >= len(mailbox):
                raise AddressError("unterminated quoted local part")
            char = mailbox[index]
            if char == '"':
                break
            if char == "\\":
                index += 1
                if index >= len(mailbox) or not " " <= mailbox[index] <= "~":
                    raise AddressError("bad backslash escape in quoted local part")
                char = mailbox[index]
            elif not (allow_utf8 or char.isascii()):
                raise AddressError("non-ASCII character in quoted local part")
            chars.append(char)
            index += 1
        end = index + 1
        user = "".join(chars)
    else:
        end = mailbox.find("@")
        if end < 0:
            raise AddressError("mailbox lacks '@domain'")
        user = mailbox[:end]
        if not (_DOT_STRING_UTF8 if allow_utf8 else _DOT_STRING).fullmatch(user):
            raise AddressError("local part is not a valid dot-string")
    if mailbox[end : end + 1] != "@":
        raise AddressError("quoted local part must be followed by '@domain'")
    if "@" in mailbox[end + 1 :]:
        raise AddressError("more than one unquoted '@' in mailbox")
    if len(mailbox[:end].encode()) > MAX_LOCAL_OCTETS:
        raise AddressError("local part longer than 64 octets")
    return user, mailbox[end + 1 :]


def _parse_domain(text: str, *, allow_utf8: bool, literal_ok: bool) -> str:
    """Check a domain or address literal; return it as stored in Address.host."""
    if text.startswith("["):
        if not literal_ok:
            raise AddressError("address literal not allowed in a source route")
        if not text.endswith("]"):
            raise AddressError("address literal lacks its closing ']'")
        _literal_ip(text)
        return text
    text = text.removesuffix(".")
    if not text:
        raise AddressError("empty domain")
    if len(text.encode()) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain longer than 255 octets")
    a_labels = [_ascii_label(label, allow_utf8=allow_utf8) for label in text.split(".")]
    if len(".".join(a_labels)) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain longer than 255 octets in A-label form")
    return text


def _ascii_label(label: str, *, allow_utf8: bool) -> str:
    """Validate one domain label and return its ASCII (A-label) form."""
    if label.isascii():
        if len(label) <= MAX_LABEL_OCTETS and _LDH_LABEL.fullmatch(label):
            return label
    elif allow_utf8 and _UTF8_LABEL.fullmatch(label) and not _IDNA_DOTS.intersection(label):
        try:
            a_label = label.encode("idna").decode("ascii")
        except ValueError:  # UnicodeError from nameprep or the codec's length checks
            a_label = ""
        # A U-label must really be one: if nameprep maps it to plain ASCII (fullwidth letters
        # become "example"), the domain the relay check sees and the one mail goes to differ.
        if (
            a_label.startswith("xn--")
            and len(a_label) <= MAX_LABEL_OCTETS
            and _LDH_LABEL.fullmatch(a_label)
        ):
            return a_label
    raise AddressError("invalid domain label")


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Only IPv4 and IPv6 literals: RFC 5321's general literals name no real tag in use."""
    inner = host[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            if _IPV6_TEXT.fullmatch(inner[5:]):
                return ipaddress.IPv6Address(inner[5:])
        elif _IPV4_TEXT.fullmatch(inner):
            return ipaddress.IPv4Address(inner)
    except ValueError:
        pass
    raise AddressError("malformed or unsupported address literal")


def _quote(user: str) -> str:
    return '"' + user.replace("\\", "\\\\").replace('"', '\\"') + '"'
