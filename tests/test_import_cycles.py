"""No two qpconn modules import each other, directly or through others (issue 16).

Pins: the import graph of every module under ``qpconn/``, read from source with :mod:`ast`
(:mod:`tests.support.importgraph`), has no cycle -- no group of modules that import each
other, no module that imports itself -- apart from the two temporary allow-lists below. An
import inside a function counts (it only hides the cycle); one under ``if TYPE_CHECKING:``
does not (it never runs). Old module paths (``qpconn.moved``) count as the modules they give.

Why it matters: a cycle makes import order matter (``ImportError: partially initialized
module`` for whoever imports the "wrong" module first), and it means two modules cannot be
understood, tested or replaced one without the other.

The finder itself is tested on small synthetic graphs and packages here too, so that a
passing run means "no cycle", not "the finder saw nothing".
"""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import pytest

from qpconn.moved import MOVED
from tests.support.importgraph import (
    ImportGraph,
    cycle_through,
    find_cycles,
    read_package,
    strongly_connected,
)

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "qpconn"

@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return read_package(PACKAGE_DIR, "qpconn", MOVED)


def describe(graph: ImportGraph, members: frozenset[str]) -> str:
    """The group, one chain of imports around it, and every other import inside it."""
    successors = graph.successors()
    chain = cycle_through(successors, members)
    lines = [f"{len(members)} module(s): {', '.join(sorted(members))}"]
    lines.append("  cycle: " + " -> ".join(chain))
    shown = [graph.edge(source, target) for source, target in itertools.pairwise(chain)]
    lines.extend(f"    {e.source} -> {e.target}  at {e.where()}" for e in shown)
    others = sorted(
        (e.source, e.target, e.where())
        for m in sorted(members)
        for e in graph.edges[m]
        if e.target in members and e not in shown
    )
    if others:
        lines.append("  other imports inside the group:")
        lines.extend(f"    {s} -> {t}  at {where}" for s, t, where in others)
    return "\n".join(lines)


# -- qpconn itself -----------------------------------------------------------------------------
def test_no_import_cycles(graph):
    unexpected = find_cycles(graph.successors())
    report = "\n\n".join(describe(graph, c) for c in unexpected)
    assert not unexpected, (
        f"{len(unexpected)} import cycle(s) in qpconn. Break each one by moving the shared "
        "piece to the module that should own it, by passing an object in instead of "
        "importing its module, or by splitting a module -- not by moving an import into a "
        "function (those count here too).\n\n" + report
    )


def test_the_graph_is_read_from_the_real_package(graph):
    """Guards against a finder that passes because it sees nothing: known imports are there."""
    assert len(graph.modules) > 100
    assert "qpconn.app.service" in graph.successors()["qpconn.app.options"]
    assert "qpconn.core.states" in graph.successors()["qpconn.core.session"]
    # inside a function: app/options.py imports app/prefork.py only when --workers is given
    assert "qpconn.app.prefork" in graph.successors()["qpconn.app.options"]
    assert graph.edge("qpconn.app.options", "qpconn.app.prefork").deferred
    # ``from qpconn.hooks import HookRunner`` reaches the runner through the package's
    # lazy __getattr__ (importlib.import_module with a literal name)
    assert "qpconn.hooks.runner" in graph.successors()["qpconn.hooks"]


# -- the finder ----------------------------------------------------------------------------
def test_finder_finds_cycles_in_a_synthetic_graph():
    successors = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},  # a -> b -> c -> a
        "d": {"e"},
        "e": {"d"},  # d <-> e, reached from the first cycle but not part of it
        "f": {"f"},  # imports itself
        "g": {"a"},  # imports into a cycle, not part of one
        "h": set(),
    }
    assert find_cycles(successors) == [
        frozenset({"a", "b", "c"}),
        frozenset({"d", "e"}),
        frozenset({"f"}),
    ]
    assert cycle_through(successors, frozenset({"a", "b", "c"})) == ["a", "b", "c", "a"]
    assert cycle_through(successors, frozenset({"f"})) == ["f", "f"]


def test_finder_on_an_acyclic_graph_and_a_long_chain():
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    # iterative: a chain far deeper than Python's recursion limit, closed at the end
    chain = {f"m{i}": {f"m{i + 1}"} for i in range(5000)}
    chain["m5000"] = {"m0"}
    assert find_cycles(chain) == [frozenset(chain)]
    assert len(strongly_connected(chain)) == 1


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_reader_resolves_imports_the_way_python_runs_them(tmp_path):
    pkg = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a/__init__.py": "",
            "a/one.py": """
                from typing import TYPE_CHECKING
                import os
                from pkg.a import two          # a submodule: pkg.a.two
                if TYPE_CHECKING:
                    from pkg.b import three    # never runs: not a dependency
                else:
                    import pkg.b.four          # does run
                def later():
                    from pkg.c import CONSTANT  # a name of pkg.c: pkg.c itself
                """,
            "a/two.py": "from . import one\nfrom .. import c\n",  # relative imports
            "b/__init__.py": "from pkg.c import CONSTANT\n",  # runs an import at its top
            "b/three.py": "",
            "b/four.py": "",
            "c.py": "CONSTANT = 1\nimport pkg.old\n",  # an old name for pkg.b.three
        },
    )
    graph = read_package(pkg, "pkg", {"pkg.old": "pkg.b.three"})
    successors = graph.successors()
    # pkg.a.one -> pkg.b too: importing pkg.b.four runs pkg/b/__init__.py, which imports
    assert successors["pkg.a.one"] == {"pkg.a.two", "pkg.b.four", "pkg.b", "pkg.c"}
    assert graph.edge("pkg.a.one", "pkg.c").deferred
    assert not graph.edge("pkg.a.one", "pkg.a.two").deferred
    assert successors["pkg.a.two"] == {"pkg.a.one", "pkg.c"}
    # pkg.b.three imports nothing, and a module's own package is not a dependency of it
    assert successors["pkg.c"] == {"pkg.b.three", "pkg.b"}
    assert successors["pkg.b"] == {"pkg.c"}
    assert successors["pkg.a"] == successors["pkg.b.four"] == set()
    assert find_cycles(successors) == [
        frozenset({"pkg.a.one", "pkg.a.two"}),
        frozenset({"pkg.b", "pkg.c"}),  # through the import pkg/b/__init__.py runs
    ]


def test_a_cycle_hidden_in_a_function_is_still_a_cycle(tmp_path):
    pkg = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "x.py": "import pkg.y\n",
            "y.py": "def f():\n    import pkg.x\n",
            "z.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.x\n",
            "w.py": "import pkg.z\n",
        },
    )
    graph = read_package(pkg, "pkg")
    assert find_cycles(graph.successors()) == [frozenset({"pkg.x", "pkg.y"})]
    assert "(in a function)" in describe(graph, frozenset({"pkg.x", "pkg.y"}))
