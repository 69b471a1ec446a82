"""The ``twistd`` command lines of README.md and docs/ survive the shell they are typed into.

An endpoint string's colons are escaped with backslashes (``interface=\\:\\:``), which an
unquoted shell word loses: README once had ``--listen tcp6:25:interface=\\:\\:`` bare, and
the shell handed twistd ``interface=::``, which Twisted refuses. Each documented line is
run by ``sh -c`` with ``twistd`` replaced by a shell function that prints the arguments it
got; every ``--listen``/``--lmtp`` value must then parse as qpconn parses it at start-up
(without binding, and without reading the certificate files of an ``ssl:`` one).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString

from qpconn.server.lmtp import LMTP_PREFIX
from qpconn.server.tlsendpoint import parse_ssl_listen

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: a shell function standing for twistd: prints its arguments as one JSON list
PRINT_ARGS = (
    f'twistd() {{ {sys.executable} -c "import json, sys; print(json.dumps(sys.argv[1:]))" '
    '"$@"; }\n'
)
TWISTD = re.compile(r"(?:(?<=\s)|^)(?:\S*/)?twistd(?=\s)")


def documented_twistd_lines() -> list[tuple[str, str]]:
    """(where, command) for each twistd command in a sh block, continuations joined."""
    found = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", text, re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.split("  #", 1)[0].strip()  # a trailing comment
                if line.startswith("#") or not TWISTD.search(line):
                    continue
                if "[" in line and "ENDPOINT" in line:
                    continue  # a synopsis, not a command
                for part in line.split("&&"):
                    if TWISTD.search(part):
                        found.append((path.name, part.strip()))
    return found


LINES = documented_twistd_lines()


def test_the_readme_and_running_md_show_twistd_lines():
    names = {where for where, _ in LINES}
    assert {"README.md", "running.md"} <= names, LINES
    assert any("tcp6:25:interface=" in line for where, line in LINES if where == "README.md")


def listen_values(argv: list[str]) -> list[str]:
    values = []
    for option, value in itertools.pairwise(argv):
        if option in ("--listen", "--lmtp") and value != "...":
            values.append(value)
    return values


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
@pytest.mark.parametrize(
    ("where", "line"), LINES, ids=[f"{where}:{n}" for n, (where, _) in enumerate(LINES)]
)
def test_each_documented_twistd_line_reaches_twistd_with_its_endpoints_intact(where, line):
    command = PRINT_ARGS + TWISTD.sub("twistd", line)
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stderr == "", (line, done.stderr)
    argv = json.loads(done.stdout.splitlines()[-1])
    for value in listen_values(argv):
        description = value.removeprefix(LMTP_PREFIX)
        if description.startswith("ssl:"):
            assert parse_ssl_listen(description) is not None, (where, value)
        else:
            serverFromString(reactor, description)  # raises on what twistd would refuse
