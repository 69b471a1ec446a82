"""The plugin API is typed: the docs' example plugins pass mypy, a wrong hook does not.

``qpconn.hooks.types`` gives type checkers every hook's signature (``Plugin`` derives from
``HookSignatures`` for them only), and ``py.typed`` ships, so an author's editor and type
checker know what ``transaction``, ``recipient`` and the results are.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [
    ROOT / "docs" / "examples" / "greylist_lite.py",
    ROOT / "docs" / "examples" / "custom_commands.py",
    ROOT / "docs" / "examples" / "qpconn-nobounces" / "qpconn_nobounces" / "__init__.py",
]

pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")


def mypy(*paths: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent",
         "--python-version", "3.11", *map(str, paths)],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )  # fmt: skip


def test_the_docs_example_plugins_type_check(tmp_path):
    result = mypy(*EXAMPLES, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_hook_with_the_wrong_arguments_is_reported(tmp_path):
    plugin = tmp_path / "wrong_plugin.py"
    plugin.write_text(
        textwrap.dedent(
            """
            from qpconn import DECLINED, Plugin, Transaction
            from qpconn.hooks.types import HookResult


            class Forgetful(Plugin):
                def hook_rcpt(self, transaction: Transaction) -> HookResult:
                    return DECLINED

                def hook_mail(self, transaction, sender, params):
                    return transaction.connection.no_such_field
            """
        ),
        encoding="utf-8",
    )
    result = mypy(plugin, cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    assert 'Signature of "hook_rcpt" incompatible with supertype' in result.stdout
    # an untyped hook is not checked (mypy's default), a typed one is
    assert "no_such_field" not in result.stdout


def test_py_typed_ships_with_the_package():
    assert (ROOT / "qpconn" / "py.typed").is_file()
    setup = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    assert "py.typed" in setup
