"""The Plugin base class and the loader that turns ``config/plugins`` lines into plugins.

A plugin is a class with ``hook_<name>`` methods, as a qpsmtpd plugin has ``hook_<name>``
subs. Each hook receives the current :class:`~qpconn.mail.transaction.Transaction` (whose
``connection`` is the session's :class:`~qpconn.mail.connection.Connection`) and the hook's own
arguments, and returns a :class:`~qpconn.hooks.results.Result`, a ``(Result, message)`` tuple,
or None for DECLINED -- directly, as a Deferred, or from ``async def``.

One plugin instance serves every session of the process, so per-session state belongs in
``transaction.notes`` or ``transaction.connection.notes``, never on ``self``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from types import ModuleType
from typing import TYPE_CHECKING, Any

from qpconn.log.level import LevelLogger

if TYPE_CHECKING:
    from qpconn.config import Config
    from qpconn.hooks.types import HookSignatures as _TypedHooks
else:  # at run time a hook is a method a plugin defines itself (see qpconn.hooks.types)
    _TypedHooks = object

__all__ = ["Plugin", "PluginLoadError", "HOOKS", "load_plugin", "load_plugins", "plugin_class_of"]

#: Every hook a plugin may implement, with qpsmtpd's names. A method is named
#: ``hook_`` + the hook name with ``-`` turned into ``_`` (``hook_pre_connection``).
HOOKS = (
    "pre-connection",
    "connect",
    "helo",
    "ehlo",
    "auth-plain",
    "auth-login",
    "auth-cram-md5",
    "auth",
    "mail_pre",
    "mail",
    "rcpt_pre",
    "rcpt",
    "data",
    "data_headers_end",
    "data_post",
    "queue_pre",
    "queue",
    "queue_post",
    "reset_transaction",
    "disconnect",
    "post-connection",
    "unrecognized_command",
    "vrfy",
    "noop",
    "help",
    "quit",
    "deny",
    "ok",
    "received_line",
)

HookFunction = Callable[..., Any]


class PluginLoadError(Exception):
    """A ``plugins`` line that names nothing loadable, or whose arguments are refused."""


class Plugin(_TypedHooks):
    """Base class for plugins. Override :meth:`register` to take the config arguments.

    Attributes available to every hook: ``self.name`` (as written in ``config/plugins``),
    ``self.args``, ``self.config`` (the config directory) and ``self.log`` (a
    ``twisted.logger.Logger`` whose namespace is the plugin's name).
    """

    #: seconds a hook of this plugin may take before the command gets 451; None uses the
    #: server-wide ``plugin_timeout``.
    timeout: float | None = None
    #: names of the config files of its own this plugin reads (``("mypolicy",)``): listed,
    #: ``python -m qpconn check`` does not warn that no setting of that name exists
    config_files: tuple[str, ...] = ()
    #: hooks this plugin may add in :meth:`register` with :meth:`register_hook`, depending
    #: on its arguments: ``python -m qpconn plugins`` lists them without loading it
    registers_hooks: tuple[str, ...] = ()
    #: the SMTPFactory serving with this plugin (set by :meth:`attach`): ``server.resolver``
    #: (DNS, obeying ``--dns-server``), ``server.clock``, ``server.me``. None until then.
    server: Any = None

    def __init__(self, config: Config, name: str | None = None, *args: str) -> None:
        self.config = config
        self.name = name or type(self).__name__
        self.args = args
        self.log = LevelLogger(namespace=f"qpconn.plugin.{self.name}")
        self._extra_hooks: list[tuple[str, HookFunction]] = []
        self.register(*args)

    def register(self, *args: Any, **kwargs: Any) -> None:
        """Called once at load time with the arguments from ``config/plugins``.

        Refuse bad arguments here (raise ``ValueError``): the server then does not start,
        which is better than discovering a typo when the first mail arrives.
        """
        if args or kwargs:
            given = " ".join([*map(str, args), *(f"{k}={v}" for k, v in kwargs.items())])
            raise ValueError(f"plugin {self.name} takes no arguments, got {given!r}")

    def attach(self, server: Any) -> None:
        """Called once the server exists, before the first session.

        Override (calling super) to use what only the running server has: its DNS
        resolver, its clock, its host name.
        """
        self.server = server
        # The plugin's log events name their server (log_source), so that the server's
        # metrics count the events of its own plugins (limit refusals, Redis outages).
        self.log.source = server

    def detach(self) -> Any:
        """Called once the server is done with this plugin: after a SIGHUP reload replaced
        it and the last session that started with it has ended, or at shutdown after the
        sessions drained.

        Override it to release what the plugin holds open (connection pools, a broker
        link, a Redis client, timers); return a Deferred if that takes a while (it is
        given up on after ten seconds). Without it, every reload would leave the replaced
        plugin's connections open for the life of the process.
        """
        return None

    def register_hook(self, hook: str, function: HookFunction) -> None:
        """Hook a function that is not named ``hook_<name>`` (as qpsmtpd's register_hook)."""
        if hook not in HOOKS:
            raise ValueError(f"unknown hook {hook!r}")
        self._extra_hooks.append((hook, function))

    def hooks(self) -> list[tuple[str, HookFunction]]:
        """(hook, function) pairs this plugin provides, in a stable order."""
        found = []
        for hook in HOOKS:
            method = getattr(self, "hook_" + hook.replace("-", "_"), None)
            if method is not None:
                found.append((hook, method))
        return found + self._extra_hooks

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {' '.join(self.args)}>".replace(" >", ">")


def _module_name(name: str) -> str:
    return "qpconn.plugins." + name.replace("/", ".").replace("-", "_")


def _plugin_class(obj: Any, name: str) -> type[Plugin]:
    """The Plugin class a module (or entry point object) stands for."""
    if inspect.isclass(obj) and issubclass(obj, Plugin):
        return obj
    if isinstance(obj, ModuleType):
        explicit = getattr(obj, "plugin_class", None)
        if explicit is not None:
            return _plugin_class(explicit, name)
        own = [
            value
            for value in vars(obj).values()
            if inspect.isclass(value)
            and issubclass(value, Plugin)
            and value.__module__ == obj.__name__
        ]
        if len(own) == 1:
            return own[0]
        raise PluginLoadError(
            f"plugin {name}: module {obj.__name__} defines {len(own)} Plugin classes; "
            "set plugin_class = TheClass in it"
        )
    raise PluginLoadError(f"plugin {name}: {obj!r} is not a Plugin class or module")


def plugin_class_of(obj: Any, name: str) -> type[Plugin]:
    """The Plugin class a module or an entry point's object stands for, as the loader
    finds it (``python -m qpconn plugins`` lists plugins without instantiating them)."""
    return _plugin_class(obj, name)


def resolve(name: str) -> type[Plugin]:
    """Find the class for a plugin name.

    In order: ``module:Class``; a shipped plugin (``queue/maildir`` is
    ``qpconn.plugins.queue.maildir``); a ``qpconn.plugins`` entry point; a dotted module.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return _plugin_class(getattr(importlib.import_module(module_name), attr), name)
        except (ImportError, AttributeError) as exc:
            raise PluginLoadError(f"plugin {name}: {exc}") from exc
    builtin = _module_name(name)
    try:
        return _plugin_class(importlib.import_module(builtin), name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not builtin.startswith(exc.name):
            raise PluginLoadError(f"plugin {name}: {exc}") from exc
    for point in entry_points(group="qpconn.plugins"):
        if point.name == name:
            return _plugin_class(point.load(), name)
    if "." in name:
        try:
            return _plugin_class(importlib.import_module(name), name)
        except ModuleNotFoundError as exc:
            raise PluginLoadError(f"plugin {name}: {exc}") from exc
    raise PluginLoadError(f"plugin {name}: no such plugin (looked for {builtin})")


def load_plugin(config: Config, name: str, *args: str) -> Plugin:
    """Instantiate one plugin; argument errors become PluginLoadError naming the line."""
    cls = resolve(name)
    try:
        return cls(config, name, *args)
    except (TypeError, ValueError, OSError) as exc:
        raise PluginLoadError(f"plugin {name} {' '.join(args)}: {exc}") from exc


def load_plugins(config: Config) -> list[Plugin]:
    """Every plugin in ``config/plugins``, in file order."""
    return [load_plugin(config, words[0], *words[1:]) for words in config.plugin_lines()]
