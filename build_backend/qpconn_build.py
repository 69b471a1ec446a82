"""The build backend: setuptools', plus mypy when the compiled build is asked for.

pyproject.toml names this module (``backend-path``). pip's isolated build installs what
``get_requires_for_build_*`` returns; setuptools alone for a plain ``pip install .``, so a
fresh machine needs neither mypy nor a compiler, and mypy too under ``QPCONN_MYPYC=1``
(setup.py then compiles with mypyc). A static ``requires`` in pyproject.toml could only
add mypy to every build; ``--no-build-isolation`` would make every compiled build depend
on what the caller's environment happens to hold.
"""

from __future__ import annotations

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the rest of the PEP 517/660 hooks)

#: what mypyc needs to build; pinned, so that a compiled build is the one CI tested
#: (a new mypy may compile differently: bump it deliberately, with the suite run compiled)
MYPYC_REQUIRES = ["mypy==2.4.1"]


SWITCH = "QPCONN_MYPYC"


def _compiling() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() not in ("", "0", "no", "false")


def _with_mypy(setuptools_requires):
    """setuptools' own requirements, plus mypy when the switch is on.

    setuptools finds its own by running setup.py, before anything is installed: with the
    switch on it would stop for lack of mypyc, so the switch is off for that one run.
    """
    if not _compiling():
        return setuptools_requires()
    switch = os.environ.pop(SWITCH)
    try:
        found = setuptools_requires()
    finally:
        os.environ[SWITCH] = switch
    return [*found, *MYPYC_REQUIRES]


def get_requires_for_build_wheel(config_settings=None):
    return _with_mypy(lambda: _setuptools.get_requires_for_build_wheel(config_settings))


def get_requires_for_build_editable(config_settings=None):
    return _with_mypy(lambda: _setuptools.get_requires_for_build_editable(config_settings))
