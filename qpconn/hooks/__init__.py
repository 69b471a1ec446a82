"""The hook machinery: the Plugin base and loader, the hook runner, results and their replies."""

# Before the subpackage layout this package was one module; its names still import from
# here (``from qpconn.hooks import HookRunner``), loaded on first use.
_MOVED_NAMES = {'HookRunner'}


def __getattr__(name: str) -> object:
    if name in _MOVED_NAMES:
        import importlib

        return getattr(importlib.import_module("qpconn.hooks.runner"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
