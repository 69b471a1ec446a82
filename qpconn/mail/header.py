"""The message header as plugins see it: ordered fields, folded lines kept as sent.

A deliberately small parser instead of :mod:`email`: the server only needs to find fields,
add trace fields on top and write the header back byte for byte. Keeping each field's raw
bytes means a message is stored exactly as it arrived, which DKIM signatures depend on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

__all__ = ["Header", "split_header", "is_field_line"]

# A field starts with a name of printable characters except ':' and space (RFC 5322 §2.2).
# No "^": match() already anchors at its pos argument, while "^" would only match at the
# very start of the text, so every field after the first would be taken for the body.
_FIELD = re.compile(rb"[!-9;-~]+:")


def split_header(data: bytes, start: int = 0) -> tuple[bytes, bytes] | int:
    """Split message text at the end of its header.

    Returns (header, body) once the header is complete, else the offset of the first line
    not yet judged, to pass back as ``start`` when more text has arrived (so a header that
    arrives line by line is scanned once, not once per line).

    The header ends at the first empty line (which belongs to neither part) or at the first
    line that is neither a field nor a continuation (which starts the body): a message
    without a header is still stored whole.
    """
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    pos = start
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return pos
        if end == pos:
            return data[:pos], data[pos + 2 :]
        first = data[pos : pos + 1]
        if first in (b" ", b"\t"):
            if pos == 0:
                return b"", data
        elif not _FIELD.match(data, pos):
            return data[:pos], data[pos:]
        pos = end + 2


def is_field_line(data: bytes) -> bool:
    """True when ``data`` starts with a header field name and colon."""
    return bool(_FIELD.match(data))


class Header:
    """Ordered header fields, each kept as its raw bytes including folding and CRLF.

    The fields are split out only when something looks at them: a server that only adds
    its Received field on top and stores the message (the common case without content
    plugins) writes the header back as it came, after the added fields, unparsed.
    """

    __slots__ = ("_parsed", "_raw", "_top")

    def __init__(self, raw: bytes = b"") -> None:
        #: the fields, once split out (None: not yet; ``_top`` + ``_raw`` hold them)
        self._parsed: list[tuple[str, bytes]] | None = None if raw else []
        self._raw = raw
        #: fields added on top (index 0) before the header was split, newest first
        self._top: list[tuple[str, bytes]] = []

    @property
    def _fields(self) -> list[tuple[str, bytes]]:
        fields = self._parsed
        if fields is None:
            fields = self._top
            fields.extend(_parse(self._raw))
            self._parsed, self._raw, self._top = fields, b"", []
        return fields

    @_fields.setter
    def _fields(self, fields: list[tuple[str, bytes]]) -> None:
        self._parsed, self._raw, self._top = fields, b"", []

    def get_all(self, name: str) -> list[str]:
        """Every value of a field (unfolded, decoded leniently), in message order."""
        wanted = name.lower()
        return [_value(raw) for key, raw in self._fields if key.lower() == wanted]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of a field, or default."""
        values = self.get_all(name)
        return values[0] if values else default

    def count(self, name: str) -> int:
        """How many times a field occurs (e.g. Received, for loop detection)."""
        wanted = name.lower()
        return sum(1 for key, _ in self._fields if key.lower() == wanted)

    def add(self, name: str, value: str, index: int | None = None, *, space: bool = True) -> None:
        """Add a field; ``index=0`` puts it on top, as trace fields must be (RFC 5321 §4.4).

        ``space=False`` writes ``name:value``, for a value that brings its own leading
        white space (a milter's, under SMFIP_HDR_LEADSPC).
        """
        entry = (name, _field_bytes(name, value, space))
        if index == 0 and self._parsed is None:
            self._top.insert(0, entry)  # on top: the rest need not be split for that
        elif index is None:
            self._fields.append(entry)
        else:
            self._fields.insert(index, entry)

    def prefix(self, name: str, text: str) -> bool:
        """Put ``text`` and a space before the value of the first field ``name`` (a Subject
        tag), keeping the rest of that field, folds and encoded words, as it came; False
        when there is no such field."""
        if "\r" in text or "\n" in text:
            raise ValueError("a prefix with a line break")
        wanted = name.lower()
        for index, (key, raw) in enumerate(self._fields):
            if key.lower() == wanted:
                head, _, rest = raw.partition(b":")
                rest = rest.lstrip(b" \t")
                tail = b" " + rest if rest.strip() else b"\r\n"
                self._fields[index] = (key, head + b": " + text.encode("utf-8") + tail)
                return True
        return False

    def change(self, name: str, occurrence: int, value: str | None, *, space: bool = True) -> bool:
        """Give the ``occurrence``-th field called ``name`` (1 for the first) a new value,
        or remove it when ``value`` is None; False when there is no such field.

        What a milter's SMFIR_CHGHEADER does; ``space`` as for :meth:`add`.
        """
        wanted = name.lower()
        seen = 0
        for index, (key, _) in enumerate(self._fields):
            if key.lower() == wanted:
                seen += 1
                if seen == occurrence:
                    if value is None:
                        del self._fields[index]
                    else:
                        self._fields[index] = (key, _field_bytes(key, value, space))
                    return True
        return False

    def raw_items(self) -> list[tuple[str, bytes]]:
        """(name, value as received: the octets after the colon, folds kept, without the
        final CRLF) of every field in order: what a filter that checks signatures over
        the exact text (a milter doing DKIM) must be given."""
        return [(key, raw.split(b":", 1)[1][:-2] if b":" in raw else b"")
                for key, raw in self._fields]  # fmt: skip

    def delete(self, name: str) -> int:
        """Remove every field of this name; return how many were removed."""
        wanted = name.lower()
        before = len(self._fields)
        self._fields = [entry for entry in self._fields if entry[0].lower() != wanted]
        return before - len(self._fields)

    def delete_if(self, name: str, predicate: Callable[[str], bool]) -> int:
        """Remove the fields of this name whose (unfolded) value satisfies ``predicate``,
        keeping every other field in place; return how many were removed.

        For fields that must go only when they claim to be ours, such as an incoming
        ``Authentication-Results`` with our authserv-id (RFC 8601 §5).
        """
        wanted = name.lower()
        before = len(self._fields)
        self._fields = [
            entry
            for entry in self._fields
            if entry[0].lower() != wanted or not predicate(_value(entry[1]))
        ]
        return before - len(self._fields)

    def names(self) -> list[str]:
        return [key for key, _ in self._fields]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for key, raw in self._fields:
            yield key, _value(raw)

    def __len__(self) -> int:
        return len(self._fields)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.count(name) > 0

    def as_bytes(self) -> bytes:
        """The header as it goes to storage, fields in order, without the blank line."""
        if self._parsed is None:
            return b"".join([raw for _, raw in self._top]) + self._raw
        return b"".join([raw for _, raw in self._parsed])


def _field_bytes(name: str, value: str, space: bool) -> bytes:
    if "\r" in value or "\n" in value.replace("\n\t", "").replace("\n ", ""):
        raise ValueError("header value with a line break that is not a fold")
    if not _FIELD.fullmatch(name.encode("utf-8", "surrogateescape") + b":"):
        raise ValueError(f"{name!r} is not a header field name")
    text = f"{name}: {value}" if space else f"{name}:{value}"
    return text.replace("\n", "\r\n").encode("utf-8", "surrogateescape") + b"\r\n"


def _parse(raw: bytes) -> list[tuple[str, bytes]]:
    """(name, raw bytes) of each field; continuation lines stay with their field."""
    fields: list[tuple[str, bytes]] = []
    for line in raw.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line)
        else:
            name = line.split(b":", 1)[0].decode("ascii", "replace").strip()
            fields.append((name, line))
    return fields


def _value(raw: bytes) -> str:
    value = raw.split(b":", 1)[1] if b":" in raw else raw
    return re.sub(rb"\r?\n[ \t]", b" ", value).strip().decode("utf-8", "replace")
