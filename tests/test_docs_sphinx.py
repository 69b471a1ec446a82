"""docs/ builds with Sphinx, warnings as errors, as CI builds it (the ``docs`` extra).

Every page must be in the table of contents, every link between pages must reach a page
and a heading that exist, and the API page's autodoc directives must find the documented
classes: any of these failing is a Sphinx warning, and ``-W`` makes it an error.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

pytest.importorskip("sphinx", reason="the docs extra (sphinx, myst-parser) is not installed")
pytest.importorskip("myst_parser", reason="the docs extra (sphinx, myst-parser) is not installed")


def build(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
               "-d", str(out / ".doctrees"), str(source), str(out)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def test_docs_build_with_warnings_as_errors(tmp_path):
    done = build(DOCS, tmp_path / "html")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    html = tmp_path / "html"
    for page in ("index", "getting-started", "running", "config", "plugins", "api",
                 "testing", "migrating"):  # fmt: skip
        assert (html / f"{page}.html").is_file(), page
    api = (html / "api.html").read_text()
    # autodoc found the classes and their documented members
    for name in ("qpconn.mail.connection.Connection", "qpconn.mail.transaction.Transaction",
                 "add_recipient", "body_chunks", "remote_host_or_unknown"):  # fmt: skip
        assert name in api, name


def test_a_broken_link_between_pages_fails_the_build(tmp_path):
    """The check above can fail: a copy of docs/ with one bad heading link does not build."""
    copy = tmp_path / "docs"
    shutil.copytree(DOCS, copy, ignore=shutil.ignore_patterns("_build"))
    page = copy / "migrating.md"
    page.write_text(page.read_text() + "\nSee [nowhere](config.md#no-such-heading).\n")
    done = build(copy, tmp_path / "html")
    assert done.returncode != 0
    assert "no-such-heading" in done.stdout + done.stderr
