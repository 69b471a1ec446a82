"""SMTP replies: the one place that turns a code and text into wire bytes.

Every reply the server sends passes through :class:`Reply`, so the rules that keep the
output well-formed live here once: a multi-line reply uses ``CODE-`` on every line but
the last, text from plugins can never inject a line break or a control character, and an
enhanced status code (RFC 2034/3463) is written on every line when the reply has one (once:
a plugin that already wrote it on each line does not get it twice). Only ASCII digits count
as codes, and a plugin's "CODE text" with a code outside 200-599 is text, not a crash.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["Reply"]

# "X.YYY.ZZZ" with X matching the reply class is RFC 3463's enhanced status code.
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)", re.ASCII)
# "CODE text" or "CODE-text" as a plugin writes a whole reply line.
_CODE_LINE = re.compile(r"^([2-5][0-9][0-9])(?:[ -]|$)")
# Anything a client could mistake for a line break or a terminal escape is replaced, so a
# plugin's message (which may quote client input) cannot forge a reply line.
_VALID_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_CLASS_DIGITS = ("2", "4", "5")
#: reply class (code // 100) -> the first digit an enhanced code of that class has
_CLASS_DIGIT = {2: "2", 4: "4", 5: "5"}
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class Reply:
    """One SMTP reply: a three-digit code, one or more lines of text, an enhanced code.

    ``text`` may be a string (split on line breaks) or a sequence of lines. When the first
    line starts with an enhanced status code of the same class it is taken as the reply's
    enhanced code, so plugin authors can write ``"5.7.1 relaying denied"`` naturally.
    """

    __slots__ = ("_made", "code", "enhanced", "lines")

    def __init__(
        self, code: int, text: str | Sequence[str] = "", enhanced: str | None = None
    ) -> None:
        if not 200 <= code <= 599:
            raise ValueError(f"not an SMTP reply code: {code!r}")
        if isinstance(text, str):
            # Most replies are the same few texts: parse each (code, text, enhanced) once.
            key: tuple[int, object, str | None] = (code, text, enhanced)
            parsed = _PARSED.get(key)
            if parsed is None:
                parsed = _parse(code, text.splitlines() or [""], enhanced)
                _remember(key, parsed)
        else:
            # EHLO's reply: the same list of lines for every session
            key = (code, tuple(text), enhanced)
            hashable = True
            try:
                parsed = _PARSED.get(key)
            except TypeError:  # lines that are not hashable: parse, do not keep
                hashable, parsed = False, None
            if parsed is None:
                lines = [part for line in text for part in (str(line).splitlines() or [""])]
                parsed = _parse(code, lines or [""], enhanced)
                if hashable:
                    _remember(key, parsed)
        self.code = code
        self.lines: tuple[str, ...] = parsed[0]
        self.enhanced = parsed[1]
        #: what was parsed, with the wire bytes once made (see to_bytes)
        self._made = parsed

    @property
    def text(self) -> str:
        """The reply's lines joined with newlines, without codes."""
        return "\n".join(self.lines)

    @property
    def is_positive(self) -> bool:
        """2xx and 3xx: the command was accepted (or intermediate)."""
        return self.code < 400

    def to_bytes(self) -> bytes:
        """The reply as it goes on the wire, every line CRLF-terminated."""
        made = self._made
        if made[0] is self.lines and made[1] is self.enhanced and made[3] == self.code:
            wire = made[2]
            if wire is None:
                wire = made[2] = self._wire_bytes()
            return wire
        # changed since it was made: from now on it has bytes of its own
        made = self._made = [self.lines, self.enhanced, self._wire_bytes(), self.code]
        return made[2]

    def _wire_bytes(self) -> bytes:
        code = self.code
        prefix = f"{self.enhanced} " if self.enhanced else ""
        lines = self.lines
        text = f"{code} {prefix}{lines[-1]}".rstrip(" ") + "\r\n"
        if len(lines) > 1:  # "CODE-" on every line but the last
            text = (
                "".join([f"{code}-{prefix}{line}".rstrip(" ") + "\r\n" for line in lines[:-1]])
                + text
            )
        if text == "334\r\n":
            text = "334 \r\n"  # RFC 4954 §4: continue-req = "334" SP [base64] CRLF
        return text.encode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.text!r}, enhanced={self.enhanced!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return (self.code, self.lines, self.enhanced) == (other.code, other.lines, other.enhanced)

    def __hash__(self) -> int:
        return hash((self.code, self.lines, self.enhanced))

    @classmethod
    def parse_line(cls, text: str, default_code: int) -> Reply:
        """A reply from ``"CODE text"`` (as a plugin returning DONE may give), else default_code."""
        match = _CODE_LINE.match(text)
        if match:
            return cls(int(match.group(1)), text[4:])
        return cls(default_code, text)


#: (code, text, enhanced) -> [lines, enhanced, wire bytes or None, code]: each text is
#: parsed once for the same few replies made over and over, and the Replies made from it
#: share its wire bytes, added when the first one is sent
_PARSED: dict[tuple[int, object, str | None], list[Any]] = {}
_PARSED_MAX = 512
#: enhanced codes given to Reply() that were checked already
_GOOD_ENHANCED: set[str] = set()


def _remember(key: tuple[int, object, str | None], parsed: list[Any]) -> None:
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.clear()  # texts with queue ids and addresses come and go
    _PARSED[key] = parsed


def _parse(code: int, lines: list[str], enhanced: str | None) -> list[Any]:
    """The safe lines and the enhanced code of a reply (``lines`` is consumed)."""
    if enhanced is not None and enhanced not in _GOOD_ENHANCED:
        if not _VALID_ENHANCED.fullmatch(enhanced):
            # It is written on every line: anything else here could break the reply apart.
            raise ValueError(f"not an enhanced status code: {enhanced!r}")
        if len(_GOOD_ENHANCED) < 256:
            _GOOD_ENHANCED.add(enhanced)
    first = lines[0]
    # only an enhanced code of the reply's own class counts: "2.x.y" for a 250
    match = _ENHANCED.match(first) if first[:1] == _CLASS_DIGIT.get(code // 100) else None
    if match:
        end = match.end()
        enhanced = first[:end].rstrip()  # "X.Y.Z" and the spaces after it: "X.Y.Z"
        lines[0] = first[end:]
    if len(lines) == 1:  # most replies: no generator for one line
        return [(_safe_line(lines[0], enhanced),), enhanced, None, code]
    return [tuple(_safe_line(line, enhanced) for line in lines), enhanced, None, code]


def _safe_line(line: str, enhanced: str | None) -> str:
    """One line as sent: without a copy of the enhanced code, nothing unprintable."""
    if enhanced and line[:1] in _CLASS_DIGITS:
        line = _strip_enhanced(line, enhanced)
    # isprintable() is a C scan that is True for most texts; the rest go through the regex
    return line if line.isprintable() else _UNSAFE.sub("?", line)


def _strip_enhanced(line: str, enhanced: str) -> str:
    """``line`` without a leading copy of ``enhanced`` (to_bytes writes it on every line)."""
    match = _ENHANCED.match(line)
    if match and ".".join(match.group(1, 2, 3)) == enhanced:
        return line[match.end() :]
    return line
