"""Module paths from before the subpackage layout, kept importable for existing code.

qpconn 0.1 had forty modules at the top of the package (``qpconn.results``,
``qpconn.address``, ``qpconn.service``, ``--logger=qpconn.logs.json_file``...). They now live in
subpackages that say what they hold; plugins, ``.tac`` files and twistd command lines
written against the old paths keep working because importing an old name gives the *same*
module object as the new one (not a copy: ``isinstance`` checks, monkeypatching and module
state behave as before). ``qpconn.hooks`` and ``qpconn.smtp`` became packages themselves; their
old contents are re-exported there lazily.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

__all__ = ["MOVED", "install"]

#: old module path -> where that module lives now
MOVED: dict[str, str] = {
    "qpconn.smtp_security": "qpconn.smtp.security",
    "qpconn.smtp_extensions": "qpconn.smtp.extensions",
    "qpconn.limits": "qpconn.smtp.limits",
    "qpconn.auth": "qpconn.core.sasl",
    "qpconn.results": "qpconn.hooks.results",
    "qpconn.verdicts": "qpconn.hooks.verdicts",
    "qpconn.connection": "qpconn.mail.connection",
    "qpconn.transaction": "qpconn.mail.transaction",
    "qpconn.address": "qpconn.mail.address",
    "qpconn.header": "qpconn.mail.header",
    "qpconn.received": "qpconn.mail.received",
    "qpconn.dsn": "qpconn.mail.dsn",
    "qpconn.spool": "qpconn.mail.spool",
    "qpconn.smtputf8": "qpconn.mail.smtputf8",
    "qpconn.lmtp": "qpconn.mail.outcomes",
    "qpconn.server.eager": "qpconn.server.fastpath.eager",
    "qpconn.server.fastwrite": "qpconn.server.fastpath.fastwrite",
    "qpconn.turnend": "qpconn.server.fastpath.turnend",
    "qpconn.tap": "qpconn.app.options",
    "qpconn.service": "qpconn.app.service",
    "qpconn.reload": "qpconn.app.reload",
    "qpconn.check": "qpconn.app.check",
    "qpconn.metrics": "qpconn.app.metrics",
    "qpconn.server.prefork": "qpconn.app.prefork",
    "qpconn.loglevel": "qpconn.log.level",
    "qpconn.logs": "qpconn.log.observers",
    "qpconn.fastlog": "qpconn.log.fasttext",
    "qpconn.twistdlog": "qpconn.log.twistd",
    "qpconn.server.logrelay": "qpconn.log.relay",
    "qpconn.checks": "qpconn.kit.policy",
    "qpconn.listed": "qpconn.kit.listcheck",
    "qpconn.blocklist": "qpconn.kit.blocklist",
    "qpconn.dns": "qpconn.kit.dns",
    "qpconn.psl": "qpconn.kit.psl",
    "qpconn.scanclient": "qpconn.kit.scanclient",
    "qpconn.greyredis": "qpconn.kit.greyredis",
    "qpconn.authresults": "qpconn.kit.authresults",
    "qpconn.groupsync": "qpconn.kit.groupsync",
    "qpconn.workers": "qpconn.kit.threads",
    "qpconn.pytest_plugin": "qpconn.testing.pytest_plugin",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and hands out the module under its new name."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        # The import system keeps the attributes the real module already has
        # (__name__, __spec__, __file__), so the module still knows its real name.
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was executed under its new name."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once; the real modules are always found first."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
