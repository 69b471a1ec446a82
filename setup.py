"""The optional mypyc-compiled build; everything else about the package is in setup.cfg.

Without ``QPCONN_MYPYC=1`` this adds nothing: the wheel is pure Python, as before, and
neither mypy nor a C compiler is needed. With it, the modules ``qpconn/compiled.py`` lists
are compiled by mypyc into extension modules beside their ``.py`` files (which stay in the
wheel as the readable source). See docs/getting-started.md.

mypy is told to ignore installed packages (``--no-site-packages``, imports of Twisted and
the like are then of type Any): the compiled code is the same whatever the build
environment holds (pip's isolated one has only setuptools and mypy), and mypyc adds no
runtime type checks on other libraries' objects.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
SWITCH = "QPCONN_MYPYC"
MYPY_OPTIONS = [
    "--follow-imports=silent",  # errors in the modules not compiled do not stop the build
    "--no-site-packages",
    "--ignore-missing-imports",
]


def compiling() -> bool:
    """The switch, as the build backend (build_backend/qpconn_build.py) reads it."""
    return os.environ.get(SWITCH, "").strip().lower() not in ("", "0", "no", "false")


def ext_modules() -> list:
    if not compiling():
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        sys.exit(f"{SWITCH}=1: mypyc (part of mypy) is needed for the compiled build: "
                 "pip install mypy, or build without the switch (pure Python)")
    sources = runpy.run_path(str(HERE / "qpconn" / "compiled.py"))["compiled_sources"](HERE)
    try:
        # group_name: one shared library named qpconn__mypyc, not a hash of the file list
        return mypycify(
            [*MYPY_OPTIONS, *sources], opt_level="3", debug_level="0", group_name="qpconn"
        )
    except SystemExit as stop:
        if stop.code in (None, 0):
            raise
        sys.exit(
            f"{SWITCH}=1: mypy/mypyc refused the modules listed in qpconn/compiled.py "
            "(the errors are above). A compiled module's annotations are checked at run "
            "time, so they must be true: fix them, mark a class "
            "@mypyc_attr(native_class=False), or add the module to EXCLUDED there. "
            f"Without {SWITCH} the build is pure Python and unaffected."
        )


setup(ext_modules=ext_modules())
