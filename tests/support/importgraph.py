"""qpconn's import graph read from source with :mod:`ast`, and the cycles in it.

Nothing is imported: a cycle that only bites in one import order (module A first works, module
B first raises ``ImportError: partially initialized module``) must be found whatever order the
test suite happens to import things in. Imports inside functions count too, because moving an
import into a function hides a cycle without removing it; imports under ``if TYPE_CHECKING:``
do not, because they never run.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Edge", "ImportGraph", "cycle_through", "find_cycles", "read_package"]


@dataclass(frozen=True)
class Edge:
    """One import statement: ``source`` needs ``target`` executed, at ``path:line``."""

    source: str
    target: str
    path: str
    line: int
    deferred: bool  # inside a function: runs later, but still a dependency

    def where(self) -> str:
        return f"{self.path}:{self.line}{' (in a function)' if self.deferred else ''}"


@dataclass
class ImportGraph:
    """Modules of one package and the imports between them."""

    modules: dict[str, Path] = field(default_factory=dict)
    edges: dict[str, list[Edge]] = field(default_factory=dict)

    def successors(self) -> dict[str, set[str]]:
        return {m: {e.target for e in self.edges.get(m, [])} for m in self.modules}

    def edge(self, source: str, target: str) -> Edge:
        """The first import statement in ``source`` that needs ``target``."""
        return next(e for e in self.edges[source] if e.target == target)


def _module_names(root: Path, package: str) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join([package, *parts])] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> Iterator[tuple[ast.AST, bool]]:
    """Every import statement, and ``importlib.import_module("literal")`` call, that can run.

    Yields (node, deferred): deferred when the node sits in a function body.
    """

    def walk(node: ast.AST, deferred: bool) -> Iterator[tuple[ast.AST, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:  # the else branch of TYPE_CHECKING does run
                    yield from walk_one(stmt, deferred)
                continue
            yield from walk_one(child, deferred)

    def walk_one(node: ast.AST, deferred: bool) -> Iterator[tuple[ast.AST, bool]]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, deferred
            return
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node, deferred
        inner = deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from walk(node, inner)

    yield from walk(tree, False)


class _Resolver:
    """Turns the names an import statement mentions into modules of the package."""

    def __init__(self, package: str, modules: Mapping[str, Path], moved: Mapping[str, str]):
        self.package = package
        self.modules = modules
        self.moved = moved

    def module(self, name: str) -> str | None:
        """``name`` as a module of the package (old names from ``moved`` mapped), else None."""
        name = self.moved.get(name, name)
        return name if name in self.modules else None

    def targets(self, node: ast.AST, importer: str) -> list[str]:
        if isinstance(node, ast.Import):
            return [t for alias in node.names if (t := self._dotted(alias.name))]
        if isinstance(node, ast.ImportFrom):
            base = self._absolute(node, importer)
            if base is None or not self._ours(base):
                return []
            found = []
            for alias in node.names:
                sub = self.module(f"{base}.{alias.name}")
                if sub is not None:  # ``from qpconn.mail import address``: the submodule
                    found.append(sub)
                elif (mod := self._dotted(base)) is not None:  # a name defined in ``base``
                    found.append(mod)
            return found
        assert isinstance(node, ast.Call)
        target = self._dotted(node.args[0].value)  # type: ignore[attr-defined]
        return [target] if target else []

    def _ours(self, name: str) -> bool:
        return name == self.package or name.startswith(self.package + ".")

    def _dotted(self, name: str) -> str | None:
        """``import a.b.c`` needs ``a.b.c``; the longest prefix that is a module, if partial."""
        if not self._ours(name):
            return None
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if (mod := self.module(".".join(parts[:end]))) is not None:
                return mod
        return None

    def _absolute(self, node: ast.ImportFrom, importer: str) -> str | None:
        if node.level == 0:
            return node.module
        is_package = self.modules[importer].name == "__init__.py"
        parts = importer.split(".")
        base = parts if is_package else parts[:-1]
        if node.level > 1:
            base = base[: -(node.level - 1)]
        if not base:
            return None
        return ".".join(base + ([node.module] if node.module else []))


def _parents(name: str) -> Iterator[str]:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:end])


def read_package(root: Path, package: str, moved: Mapping[str, str] | None = None) -> ImportGraph:
    """Read every module under ``root`` (the directory of ``package``) into an import graph.

    ``moved`` maps old module names to the ones they are now (``qpconn.moved.MOVED``), so an
    import of an old path counts as an import of the module it gives.

    Importing ``qpconn.a.b`` needs ``qpconn.a.b``; it also runs ``qpconn/a/__init__.py`` first,
    so it needs ``qpconn.a`` as well when that ``__init__`` itself imports modules at its top
    level, and when the importer is not inside ``qpconn.a`` already (a module's own packages
    have always started executing before it does).
    """
    modules = _module_names(root, package)
    resolver = _Resolver(package, modules, moved or {})
    graph = ImportGraph(modules=modules)
    raw: dict[str, list[Edge]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = str(path.relative_to(root.parent))
        raw[name] = [
            Edge(name, target, rel, node.lineno, deferred)  # type: ignore[attr-defined]
            for node, deferred in _imports(tree)
            for target in dict.fromkeys(resolver.targets(node, name))  # once per statement
        ]
    runs_imports = {
        name
        for name, path in modules.items()
        if path.name == "__init__.py" and any(not e.deferred for e in raw[name])
    }
    for name, edges in raw.items():
        own = set(_parents(name)) | {name}
        full: list[Edge] = []
        for e in edges:
            full.append(e)
            full.extend(
                Edge(name, parent, e.path, e.line, e.deferred)
                for parent in _parents(e.target)
                if parent in runs_imports and parent not in own
            )
        graph.edges[name] = full
    return graph


def strongly_connected(successors: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit to hit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(successors):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = []
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        work.append((start, iter(sorted(successors.get(start, ())))))
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(successors.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def find_cycles(successors: Mapping[str, Iterable[str]]) -> list[frozenset[str]]:
    """Every set of modules that import each other: components of more than one module, and
    modules that import themselves. Sorted for a stable report."""
    cycles = [
        frozenset(c)
        for c in strongly_connected(successors)
        if len(c) > 1 or c[0] in set(successors.get(c[0], ()))
    ]
    return sorted(cycles, key=lambda c: (-len(c), sorted(c)))


def cycle_through(successors: Mapping[str, Iterable[str]], members: frozenset[str]) -> list[str]:
    """One shortest closed chain inside ``members``, starting at its smallest member:
    ``[a, b, c, a]`` means a imports b imports c imports a."""
    start = min(members)
    parent: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for child in sorted(successors.get(node, ())):
            if child not in members:
                continue
            if child == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return [*reversed(chain), start]
            if child not in seen:
                seen.add(child)
                parent[child] = node
                queue.append(child)
    raise ValueError(f"no cycle through {start} inside {sorted(members)}")
