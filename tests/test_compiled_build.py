"""The optional mypyc-compiled build (issue 20): the switch, and proof that a run used it.

Pins: a plain build asks for nothing but setuptools (``pip install .`` on a fresh machine
needs neither mypy nor a compiler), ``QPCONN_MYPYC=1`` adds mypy; the compiled build
covers every module of the packages qpconn/compiled.py lists; and when ``QPCONN_EXPECT_COMPILED=1``
is set (.ci/run's second pass, .ci/test-compiled) the test process and the subprocesses the
tests start (twistd, ``python -m qpconn``) import those modules as extension modules.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qpconn.compiled import (
    COMPILED_MODULES,
    COMPILED_PACKAGES,
    compiled_sources,
    module_names,
    status,
)
from tests.support.compiled import EXPECT, expecting_compiled, not_compiled

ROOT = Path(__file__).resolve().parent.parent
BUILD_FILES = ("pyproject.toml", "setup.cfg", "setup.py", "README.md", "build_backend", "qpconn")


def build_requires(tmp_path: Path, switch: str | None) -> list[str]:
    """What the build backend asks pip to install for a wheel, in a copy of the tree.

    A subprocess in a copy, as pip runs it: setuptools runs setup.py (and writes its
    egg-info) to find its own requirements.
    """
    source = tmp_path / "src"
    source.mkdir()
    for name in BUILD_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.so"))  # fmt: skip
        else:
            shutil.copy2(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k != "QPCONN_MYPYC"}
    if switch is not None:
        env["QPCONN_MYPYC"] = switch
    env["PYTHONPATH"] = str(source / "build_backend")
    done = subprocess.run(
        [sys.executable, "-c",
         "import json, qpconn_build as b; print(json.dumps(b.get_requires_for_build_wheel()))"],
        cwd=source, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_plain_build_needs_no_mypy(tmp_path):
    requires = build_requires(tmp_path, None)
    assert not [r for r in requires if r.startswith("mypy")], requires


@pytest.mark.parametrize("switch", ["0", ""])
def test_switch_off_values_build_pure(tmp_path, switch):
    assert not [r for r in build_requires(tmp_path, switch) if r.startswith("mypy")]


def test_switch_adds_mypy_to_the_build_requirements(tmp_path):
    requires = build_requires(tmp_path, "1")
    assert [r for r in requires if r.startswith("mypy==")], requires


def test_compiled_build_covers_its_packages_and_modules():
    sources = compiled_sources(ROOT)
    for package in COMPILED_PACKAGES:
        expected = sorted(
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / package).glob("*.py")
            if p.name != "__init__.py"
        )
        assert expected and [s for s in sources if s.startswith(package + "/")] == expected
    for module in COMPILED_MODULES:
        assert (ROOT / module).is_file(), f"qpconn/compiled.py lists {module}, which is gone"
        assert module in sources
    assert "qpconn.core.session" in module_names() and "qpconn.core.receive" in module_names()


def test_status_tells_source_from_extension_modules():
    found = status()
    assert set(found) == set(module_names())
    # in this process, what status() says is what the imports gave
    assert sorted(n for n, compiled in found.items() if not compiled) == sorted(
        line.split(":")[0] for line in not_compiled()
    )


@pytest.mark.skipif(not expecting_compiled(), reason=f"{EXPECT}=1 is not set (a pure run)")
def test_this_run_imported_the_compiled_modules():
    assert not_compiled() == []


@pytest.mark.skipif(not expecting_compiled(), reason=f"{EXPECT}=1 is not set (a pure run)")
def test_subprocesses_import_the_compiled_modules(tmp_path):
    """``python -m qpconn.compiled`` from a test directory: the interpreter and working
    directory the tests give twistd (tests/support/process.py) and ``python -m qpconn``."""
    done = subprocess.run(
        [sys.executable, "-m", "qpconn.compiled"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(module_names())} of {len(module_names())} modules compiled" in done.stdout
