"""The plugins this installation can load, with their documentation, for operators and docs.

``python -m qpconn plugins`` lists them, ``python -m qpconn help PLUGIN`` prints one's
documentation, and docs/plugins.md's table of shipped plugins is generated from the same
entries (:func:`markdown_table`; ``tests/test_ops_cli.py`` fails when the two differ). So
a plugin has one documentation source, its docstring: the module's for a module plugin
(every shipped plugin), the class's for an entry point that names a class. Its first line
reads ``name [arguments]: what it does.``; the part after ``: `` is the one-line purpose.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
import textwrap
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import TextIO

from qpconn.hooks.plugin import HOOKS, Plugin, PluginLoadError, plugin_class_of

__all__ = [
    "PluginEntry",
    "shipped",
    "from_entry_points",
    "find",
    "markdown_table",
    "plugins_main",
    "help_main",
]

ENTRY_POINT_GROUP = "qpconn.plugins"


@dataclass(frozen=True)
class PluginEntry:
    """One loadable plugin: its name in ``config/plugins`` and where its text comes from."""

    name: str
    #: "shipped", or "entry point of DIST" for an installed package's plugin
    origin: str
    plugin_class: type[Plugin] | None
    #: the documentation, dedented (the module's or the class's docstring)
    doc: str
    #: why it cannot be loaded (an entry point whose package is broken), or None
    error: str | None = None

    @property
    def summary(self) -> str:
        """The one-line purpose: the doc's first line without its ``name ...:`` prefix."""
        first = self.doc.strip().splitlines()[0] if self.doc.strip() else ""
        head, sep, rest = first.partition(": ")
        words = head.split()
        if sep and words and words[0].replace("-", "_") == self.name.replace("-", "_"):
            return rest.strip()
        return first.strip()

    @property
    def hooks(self) -> list[str]:
        """The hooks the class implements, in run order: its ``hook_<name>`` methods and
        those it declares in ``registers_hooks`` (added in ``register`` with
        ``register_hook``, depending on its arguments)."""
        cls = self.plugin_class
        if cls is None:
            return []
        declared = set(getattr(cls, "registers_hooks", ()))
        return [
            hook
            for hook in HOOKS
            if hook in declared or getattr(cls, "hook_" + hook.replace("-", "_"), None) is not None
        ]


def _doc_of(obj: object) -> str:
    return inspect.cleandoc(getattr(obj, "__doc__", None) or "")


def shipped() -> list[PluginEntry]:
    """Every plugin in :mod:`qpconn.plugins`, by its qpsmtpd name (``queue/maildir``)."""
    import qpconn.plugins as package

    found = []
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.ispkg:
            continue  # auth/, queue/, virus/ hold plugins; they are not plugins
        module = importlib.import_module(info.name)
        name = info.name.removeprefix(package.__name__ + ".").replace(".", "/")
        found.append(PluginEntry(name, "shipped", plugin_class_of(module, name), _doc_of(module)))
    return sorted(found, key=lambda entry: entry.name)


def from_entry_points() -> list[PluginEntry]:
    """Plugins installed packages declare in the ``qpconn.plugins`` entry point group."""
    found = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(point, "dist", None)
        origin = f"entry point of {dist.name} {dist.version}" if dist else "entry point"
        try:
            obj = point.load()
            cls = plugin_class_of(obj, point.name)
        except (ImportError, AttributeError, PluginLoadError) as exc:
            found.append(PluginEntry(point.name, origin, None, "", f"cannot load: {exc}"))
            continue
        # A module stands for its plugin class; its docstring is the documentation.
        source: object = obj if isinstance(obj, ModuleType) else cls
        doc = _doc_of(source) or _doc_of(cls)
        found.append(PluginEntry(point.name, origin, cls, doc))
    return sorted(found, key=lambda entry: entry.name)


def find(name: str) -> PluginEntry:
    """The entry for a plugin name as ``config/plugins`` writes it; LookupError if unknown.

    The name is resolved as the server resolves it (:func:`qpconn.hooks.plugin.resolve`),
    so ``queue/smtp-forward``, ``module:Class`` and dotted paths work too.
    """
    from qpconn.hooks.plugin import resolve

    wanted = name.replace("-", "_")
    for entry in shipped():
        if entry.name == wanted:
            return entry
    for entry in from_entry_points():
        if entry.name == name:
            return entry
    try:
        cls = resolve(name)
    except PluginLoadError as exc:
        raise LookupError(str(exc)) from None
    module = inspect.getmodule(cls)
    doc = _doc_of(cls) if ":" in name or module is None else _doc_of(module) or _doc_of(cls)
    return PluginEntry(name, f"{cls.__module__}.{cls.__qualname__}", cls, doc)


def markdown_table(entries: list[PluginEntry]) -> str:
    """The table docs/plugins.md shows, one row per plugin: name, hooks, purpose."""
    rows = ["| Plugin | Hooks | What it does |", "|---|---|---|"]
    for entry in entries:
        hooks = ", ".join(f"`{hook}`" for hook in entry.hooks)
        summary = entry.summary.replace("``", "`").replace("|", "\\|")
        rows.append(f"| `{entry.name}` | {hooks} | {summary} |")
    return "\n".join(rows) + "\n"


def _write_entry(entry: PluginEntry, out: TextIO, where: str = "") -> None:
    out.write(f"  {entry.name}{where}\n")
    if entry.error:
        out.write(f"      {entry.error}\n")
        return
    for line in textwrap.wrap(entry.summary or "(no docstring)", 76):
        out.write(f"      {line}\n")
    out.write(f"      hooks: {', '.join(entry.hooks) or '(none named hook_<name>)'}\n")


def plugins_main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """``python -m qpconn plugins``: every loadable plugin, its purpose and its hooks."""
    out = out or sys.stdout
    parser = argparse.ArgumentParser(
        prog="python -m qpconn plugins",
        description="List the shipped plugins and those installed packages declare "
        f"(entry point group {ENTRY_POINT_GROUP}), with their purpose and hooks.",
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the shipped plugins as the table in docs/plugins.md",
    )
    args = parser.parse_args(argv)
    if args.markdown:
        out.write(markdown_table(shipped()))
        return 0
    out.write("shipped plugins:\n")
    for entry in shipped():
        _write_entry(entry, out)
    installed = from_entry_points()
    out.write(f"installed plugins (entry point group {ENTRY_POINT_GROUP}):\n")
    if not installed:
        out.write("  (none)\n")
    for entry in installed:
        _write_entry(entry, out, f" ({entry.origin})")
    out.write("python -m qpconn help PLUGIN prints a plugin's documentation.\n")
    return 0


def help_main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """``python -m qpconn help PLUGIN``: a plugin's documentation, from its docstring."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(
        prog="python -m qpconn help",
        description="Print a plugin's documentation (its docstring) and the hooks it implements.",
    )
    parser.add_argument("plugin", help="a name as config/plugins writes it (queue/maildir)")
    args = parser.parse_args(argv)
    try:
        entry = find(args.plugin)
    except LookupError as exc:
        err.write(f"error: {exc}\n(python -m qpconn plugins lists the plugins)\n")
        return 1
    if entry.error:
        err.write(f"error: plugin {entry.name}: {entry.error}\n")
        return 1
    assert entry.plugin_class is not None
    cls = entry.plugin_class
    out.write(f"{entry.name} ({entry.origin}: {cls.__module__}.{cls.__qualname__})\n\n")
    out.write((entry.doc or "(no docstring)") + "\n\n")
    out.write(f"hooks: {', '.join(entry.hooks) or '(none named hook_<name>)'}\n")
    return 0
