"""Organizational domains (RFC 7489 §3.2) from the Public Suffix List, for DMARC alignment.

DMARC's relaxed alignment compares *organizational* domains: ``mail.example.co.uk`` and
``example.co.uk`` align, ``a.co.uk`` and ``b.co.uk`` must not. Only the Public Suffix List
says where the registrable part starts, so it is read from a file: by default the one
Debian's ``publicsuffix`` package installs (kept current by the distribution's updates,
no network access at run time). Without that file the last two labels are taken, which
is right for ``example.org`` and wrong for ``example.co.uk``: a warning says so.

The matching follows the list's published algorithm: the longest matching rule wins,
``*`` matches one label, ``!`` rules are exceptions, and an unlisted TLD is a suffix.
"""

from __future__ import annotations

import os
from functools import lru_cache

__all__ = ["DEFAULT_PATH", "SuffixList", "load"]

DEFAULT_PATH = "/usr/share/publicsuffix/public_suffix_list.dat"


class SuffixList:
    """The rules of one list file; ``organizational_domain()`` is what DMARC needs."""

    def __init__(self, lines: list[str] | None) -> None:
        #: None: no list (fall back to the last two labels)
        self.rules: set[str] | None = None
        self.exceptions: set[str] = set()
        if lines is None:
            return
        self.rules = set()
        for raw in lines:
            line = raw.strip().split()[0] if raw.strip() else ""
            if not line or line.startswith("//"):
                continue
            line = line.lower()
            try:
                line = line.encode("idna").decode("ascii") if not line.isascii() else line
            except UnicodeError:
                continue
            if line.startswith("!"):
                self.exceptions.add(line[1:])
            else:
                self.rules.add(line)

    def public_suffix_length(self, labels: list[str]) -> int:
        """How many trailing labels of ``labels`` form the public suffix."""
        assert self.rules is not None
        best = 1  # the implicit "*" rule: an unlisted TLD is a public suffix
        for count in range(1, len(labels) + 1):
            tail = labels[-count:]
            name = ".".join(tail)
            if name in self.exceptions:
                return count - 1
            wildcard = ".".join(["*", *tail[1:]])
            if name in self.rules or wildcard in self.rules:
                best = count
        return best

    def organizational_domain(self, domain: str) -> str:
        """The registered domain of ``domain`` (the public suffix plus one label)."""
        labels = [label for label in domain.lower().rstrip(".").split(".") if label]
        if not labels:
            return ""
        if self.rules is None:
            return ".".join(labels[-2:])
        keep = min(len(labels), self.public_suffix_length(labels) + 1)
        return ".".join(labels[-keep:])


@lru_cache(maxsize=8)
def _load(path: str, stamp: float) -> SuffixList:
    with open(path, encoding="utf-8") as handle:
        return SuffixList(handle.read().splitlines())


def load(path: str = DEFAULT_PATH) -> SuffixList:
    """The list in ``path`` (cached until the file changes); an empty list if it is missing."""
    try:
        stamp = os.stat(path).st_mtime
    except OSError:
        return SuffixList(None)
    return _load(path, stamp)
