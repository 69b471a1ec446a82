"""The fenced code blocks of README.md and docs/*.md, with the marker that precedes each.

A block is preceded (on the nearest line that is not blank) by at most one marker, an
HTML comment the reader sees in the source:

* ``<!-- example: NAME -->``: a test reads the block by that marker and runs it;
* ``<!-- run by: PATH (why, optional) -->``: the file PATH (a test, or ``.ci/run``) runs it;
* ``<!-- not run: REASON -->``: it cannot be run here, for REASON; it is still checked
  (Python compiled, shell parsed and its commands and options looked up).

tests/test_docs_blocks.py runs or checks every block by these rules.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
MARKER = re.compile(r"^<!--\s*(example|run by|not run):\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(```+)\s*([^\s`]*)")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language word, its text and its marker."""

    page: str  # "README.md", "docs/running.md"
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None = None  # "example", "run by", "not run"
    value: str = ""  # the marker's name, path or reason

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(langs: tuple[str, ...] = ("python", "sh")) -> list[Block]:
    """Every fenced block in ``langs`` of every page, in page order."""
    found = []
    for path in pages():
        lines = path.read_text(encoding="utf-8").splitlines()
        index = 0
        while index < len(lines):
            opening = FENCE.match(lines[index])
            if not opening:
                index += 1
                continue
            fence, lang = opening.groups()
            end = index + 1
            while end < len(lines) and not lines[end].startswith(fence):
                end += 1
            before = next((line for line in reversed(lines[:index]) if line.strip()), "")
            marked = MARKER.match(before.strip())
            if lang in langs:
                found.append(Block(
                    path.relative_to(REPO).as_posix(), index + 1, lang,
                    "\n".join(lines[index + 1 : end]) + "\n",
                    marked.group(1) if marked else None, marked.group(2) if marked else "",
                ))  # fmt: skip
            index = end + 1
    return found


def logical_lines(text: str) -> list[str]:
    """The shell lines of a block: continuations joined, blank and comment lines left out."""
    joined = text.replace("\\\n", " ")
    return [line for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at ``&&``, ``||``, ``|``, ``;``), as
    words, without leading ``NAME=value`` assignments and without redirections."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    result: list[list[str]] = [[]]
    redirect = False
    for token in lexer:
        if token in ("&&", "||", "|", ";", "&"):
            result.append([])
        elif token in (">", ">>", "<", "2>", ">&"):
            redirect = True
        elif redirect:
            redirect = False
        else:
            result[-1].append(token)
    cleaned = []
    for words in result:
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            cleaned.append(words)
    return cleaned
