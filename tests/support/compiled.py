"""The compiled build's guard: are the modules of qpconn/compiled.py extension modules here?

``.ci/run`` runs the suite a second time against the mypyc-compiled build with
``QPCONN_EXPECT_COMPILED=1`` set. ``python -m pytest`` puts the checkout first on
``sys.path``, so a checkout without the extension modules beside its ``.py`` files would
quietly test pure Python again; this check (tests/conftest.py, before any test) and
tests/test_compiled_build.py (the same in a subprocess, as twistd gets it) make that run
fail instead.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os

from qpconn.compiled import module_names

EXPECT = "QPCONN_EXPECT_COMPILED"


def expecting_compiled() -> bool:
    return os.environ.get(EXPECT, "") not in ("", "0")


def not_compiled() -> list[str]:
    """The compiled build's modules that this process imported from source, as 'name: file'."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = []
    for name in module_names():
        module = importlib.import_module(name)
        where = getattr(module, "__file__", None) or ""
        if not where.endswith(suffixes):
            found.append(f"{name}: {where}")
    return found


def check_compiled_imports() -> str | None:
    """A message saying what is wrong when a compiled build is expected and not imported."""
    if not expecting_compiled():
        return None
    missing = not_compiled()
    if not missing:
        return None
    return (
        f"{EXPECT}=1 but these modules were imported from Python source, not the "
        "mypyc-compiled build (build it with .ci/test-compiled, which puts the extension "
        "modules beside the .py files):\n  " + "\n  ".join(missing)
    )
