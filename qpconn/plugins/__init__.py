"""The plugins shipped with qpconn, under their qpsmtpd names (``queue/maildir``, ``dnsbl``...).

The Plugin base class and the loader live in :mod:`qpconn.hooks.plugin`; they are importable
from here too, where plugin authors have always found them (``from qpconn.plugins import
Plugin``).
"""

from qpconn.hooks.plugin import (
    HOOKS,
    HookFunction,
    Plugin,
    PluginLoadError,
    load_plugin,
    load_plugins,
    resolve,
)

__all__ = ["Plugin", "PluginLoadError", "HOOKS", "HookFunction", "load_plugin", "load_plugins",
           "resolve"]
