"""The source tree a new user meets: its layout, the README quick start and ``.ci/run``.

``tests/test_packaging.py`` proves that ``pip install .`` and ``pip install -e .`` make
``twistd qpconn`` work; this module checks what issue 2 fixed about the tree itself (the
files at the top, a two-command quick start, CI running the README's test command
verbatim), so that a refactoring cannot quietly break what a new user types first.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no sh block in the quick start"
    return [
        line.strip()
        for line in block.group(1).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_layout():
    for name in ("pyproject.toml", "setup.cfg", "README.md", "qpconn/__init__.py", "docs"):
        assert (ROOT / name).exists(), name
    assert (ROOT / "twisted" / "plugins" / "qpconn_plugin.py").is_file()
    # twisted/plugins is a namespace shared with Twisted itself: an __init__.py there
    # would shadow the real twisted package for everyone who installs qpconn.
    assert not (ROOT / "twisted" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()
    ci = ROOT / ".ci" / "run"
    assert ci.is_file() and os.access(ci, os.X_OK)


def test_readme_quick_start_is_two_commands_one_serving_one_testing():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    serve, test = commands
    assert "pip install ." in serve and "twistd -n qpconn" in serve
    assert "pip install -e '.[test]'" in test and "pytest" in test


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = quick_start_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    assert ci_lines[0].startswith("#!") and "set -euo pipefail" in ci_lines
