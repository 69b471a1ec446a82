"""Reloading the config directory and plugin list on SIGHUP, without dropping a session.

A reload builds everything anew exactly as ``python -m qpconn check`` does
(:func:`qpconn.app.check.build`): the settings, every plugin with its arguments, the hook
table. Only when all of it succeeds is it swapped into the running factory; a directory
with an error is refused with one logged line giving the reason, and the server goes on
with what it had.

Sessions copy the factory's config, plugins and limits when they start
(``SMTPServerProtocol.connectionMade``), so a session in flight finishes with the set it
started with, and every session accepted after the swap uses the new one.

The new ``loglevel`` applies at once, and the validator's warnings (qpconn.settings) are
logged as at start-up.

The replaced plugins are detached (:meth:`~qpconn.hooks.plugin.Plugin.detach`: their
pools, broker links and Redis clients closed) once the last session that started with
them has ended (:mod:`qpconn.server.retire`).

What a reload does not change: the listening endpoints, the peer-lookup and PROXY
settings (they come from the command line, and their timeouts are read at start-up),
and the sessions open now.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.logger import Logger

from qpconn.app.check import CheckError, build
from qpconn.log.level import parse_level, set_level
from qpconn.settings import log_warnings

if TYPE_CHECKING:
    from qpconn.server.factory import SMTPFactory

__all__ = ["reload_factory", "ReloadOnSignal"]

log = Logger(namespace="qpconn.reload")

#: Factory attributes that belong to the running server, not to the config: kept.
_LIVE = frozenset(
    {
        "sessions",
        "connection_counter",  # the sessions open and each address's recent ones
        "connections_total",
        "clock",
        "idle_timers",  # the open sessions' idle timers are in its heap
        "resolver",
        "peer_info",
        "lookups",
        "proxy",
        "protocol",
        "plugins",
        "retired",
        "runner",
        "metrics",
        "tracer",
    }
)


def reload_factory(factory: SMTPFactory) -> bool:
    """Re-read ``factory``'s config directory and plugin list; True if the new set is in use.

    Overrides given at start-up (``--hostname``, ``--tls-cert``...) are kept.
    """
    config = factory.config
    overrides = {name: list(value) for name, value in getattr(config, "_overrides", {}).items()}
    try:
        built = build(config.directory, None, clock=factory.clock, overrides=overrides)
        for plugin in built.plugins:
            plugin.attach(factory)
    except Exception as exc:  # CheckError, or a plugin refusing to attach
        problems = exc.problems if isinstance(exc, CheckError) else [str(exc)]
        log.error(
            "reload refused, keeping the running configuration: {reason}",
            reason="; ".join(problems),
            config_dir=config.directory,
            result="refused",
        )
        return False
    built.runner.observer = factory.runner.observer
    for name, value in vars(built.probe).items():
        if name not in _LIVE and not name.startswith("_"):
            setattr(factory, name, value)
    replaced = factory.plugins
    factory.plugins = built.plugins
    factory.runner = built.runner
    # The sessions open now finish with the old set; it is detached after the last of them.
    factory.retired.retire(replaced, factory.sessions)
    log.info(
        "reloaded {config_dir}: {count} plugins ({names})",
        config_dir=config.directory or "(built-in defaults)",
        count=len(built.plugins),
        names=" ".join(plugin.name for plugin in built.plugins),
        result="reloaded",
    )
    set_level(parse_level(built.config.get("loglevel") or "debug"))  # checked by build()
    log_warnings(built.warnings, config.directory)
    return True


class ReloadOnSignal(Service):
    """While running, SIGHUP reloads the factory (in the reactor thread, never in the
    signal handler itself); stopping restores the previous handler."""

    def __init__(self, factory: SMTPFactory, signum: int = signal.SIGHUP) -> None:
        self.factory = factory
        self.signum = signum
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        def handler(signum: int, frame: Any) -> None:
            reactor.callFromThread(reload_factory, self.factory)

        self._previous = signal.signal(self.signum, handler)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
