"""The examples in docs/, for tests that run them as written."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent.parent / "docs"


def plugins_example(name: str, page: str = "config.md") -> list[str]:
    """The ``plugins`` lines of the block marked ``<!-- example: NAME -->`` in ``page``."""
    text = (DOCS / page).read_text(encoding="utf-8")
    start = f"<!-- example: {name} -->\n```\n"
    begin = text.index(start) + len(start)
    return [line for line in text[begin : text.index("```", begin)].splitlines() if line]
