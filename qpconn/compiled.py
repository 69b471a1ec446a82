"""Which modules the optional mypyc build compiles, and whether this installation has them.

``QPCONN_MYPYC=1 pip install .`` compiles the sans-I/O core and the command layer with
mypyc (docs/getting-started.md); a plain ``pip install .`` is pure Python and stays the
reference. The list lives here, in the package, so that the build (``setup.py`` reads this
file without importing qpconn: it uses the standard library only), the test suite's guard
(``QPCONN_EXPECT_COMPILED=1``, tests/conftest.py) and an administrator asking "is this
install compiled?" all read the same one::

    python -m qpconn.compiled

A compiled module is an extension module (``session.cpython-311-x86_64-linux-gnu.so``)
beside its ``.py`` file; Python's import prefers the extension, so the ``.py`` stays as the
readable source. Whole packages are listed, not files: a module someone adds to
``qpconn/core/`` is compiled too, and a mypy error in it fails the compiled build loudly.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__all__ = [
    "COMPILED_MODULES", "COMPILED_PACKAGES", "EXCLUDED",
    "compiled_sources", "module_names", "status",
]  # fmt: skip

#: packages whose every module (but ``__init__``) the compiled build compiles
COMPILED_PACKAGES = ("qpconn/core",)
#: single modules compiled besides those packages (hot ones that measured worth it).
#: Not the command handlers (smtp/commands.py, context.py, security.py, extensions.py,
#: xclient.py, lmtp.py): they are mixins (multiple inheritance), which mypyc compiles only
#: as non-native classes, and mypyc's methods of a non-native class refuse an instance of
#: a subclass it did not compile (TypeError "SMTPCommands object expected"), which every
#: SMTPCommands subclass of docs/protocol.md is.
#: hooks/runner.py and results.py run every hook (bench/RESULTS.md: ~3% of ii's instructions
#: more); mail/address.py is subclassed by interpreted code, server/output.py deletes an
#: attribute, so neither can be native, and neither paid.
COMPILED_MODULES: tuple[str, ...] = ("qpconn/hooks/runner.py", "qpconn/hooks/results.py")
#: modules of those packages that stay pure Python in the compiled build too
EXCLUDED: frozenset[str] = frozenset()


def compiled_sources(root: str | Path) -> list[str]:
    """The source files to compile, relative to the project ``root``, in a stable order."""
    base = Path(root)
    found = []
    for package in COMPILED_PACKAGES:
        for path in sorted((base / package).glob("*.py")):
            relative = path.relative_to(base).as_posix()
            if path.name != "__init__.py" and relative not in EXCLUDED:
                found.append(relative)
    found.extend(module for module in COMPILED_MODULES if (base / module).is_file())
    return found


def module_names(root: str | Path | None = None) -> list[str]:
    """The dotted names of the compiled build's modules (read from this package's tree)."""
    if root is None:
        root = Path(__file__).resolve().parent.parent
    return [source[: -len(".py")].replace("/", ".") for source in compiled_sources(root)]


def status() -> dict[str, bool]:
    """Module name -> whether its import finds the compiled extension module here.

    Asked of the import system (``find_spec``), without importing: the answer is what an
    import in this process would load, e.g. the checkout's ``.py`` when it comes first on
    ``sys.path``.
    """
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    result = {}
    for name in module_names():
        spec = importlib.util.find_spec(name)
        result[name] = bool(spec and spec.origin and spec.origin.endswith(suffixes))
    return result


def main() -> int:
    """Print each module and how it is built; exit status 0 when all are compiled."""
    found = status()
    for name, compiled in found.items():
        print(f"{'compiled' if compiled else 'pure    '}  {name}")
    built = sum(found.values())
    print(f"{built} of {len(found)} modules compiled" + ("" if built else " (a pure build)"))
    return 0 if built == len(found) else 1


if __name__ == "__main__":
    sys.exit(main())
