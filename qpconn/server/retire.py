"""Plugins a reload replaced, detached once the last session that uses them has ended.

A SIGHUP reload (:mod:`qpconn.app.reload`) builds a new set of plugins, and the sessions
open at that moment finish with the set they started with. The old set therefore cannot
be torn down at the reload: a forwarding pool, an AMQP link or a Redis client may still
carry a message of such a session. Nor may it be forgotten: every reload would leave its
predecessor's connections open until the process ends (a next hop's idle connections, a
broker connection each, a Redis pool each).

So a replaced set is *retired*: it remembers which sessions were open when it was
replaced, and when the last of them has ended each of its plugins'
:meth:`~qpconn.hooks.plugin.Plugin.detach` runs. At shutdown, after the sessions have
drained, the running set and any set still waiting are detached too, so a plugin sees one
``attach`` and one ``detach`` in its life whichever way it ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

__all__ = ["RetiredPlugins", "detach_plugins", "DETACH_TIMEOUT"]

#: seconds a plugin's detach may take before it is given up on (and logged)
DETACH_TIMEOUT = 10.0

log = Logger(namespace="qpconn.reload")


def detach_plugins(plugins: Iterable[Any], clock: Any) -> defer.Deferred[None]:
    """Run every plugin's ``detach``; one that raises, fails or hangs is logged, never
    allowed to stop the others. Fires when all are done (or timed out)."""
    waits = []
    for plugin in plugins:
        try:
            result = plugin.detach()
        except Exception as exc:  # a plugin's bug must not keep the others' connections
            _failed(plugin, exc)
            continue
        if isinstance(result, defer.Deferred):
            result.addTimeout(DETACH_TIMEOUT, clock)
            result.addErrback(lambda failure, plugin=plugin: _failed(plugin, failure.value))
            waits.append(result)
    done: defer.Deferred[Any] = defer.DeferredList(waits, consumeErrors=True)
    return done.addCallback(lambda _: None)


def _failed(plugin: Any, error: BaseException) -> None:
    log.error(
        "plugin {plugin} failed to detach: {error}",
        plugin=getattr(plugin, "name", repr(plugin)),
        error=error,
        event="plugin_detach",
        result="detach_failed",
    )


class RetiredPlugins:
    """The plugin sets a reload replaced, each with the sessions that still use it."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        #: [(plugins, sessions still open that started with them)], oldest first
        self.waiting: list[tuple[list[Any], set[Any]]] = []

    def retire(self, plugins: list[Any], sessions: Iterable[Any]) -> defer.Deferred[None] | None:
        """``plugins`` are no longer used by new sessions; ``sessions`` are the ones open
        now (they use ``plugins`` to their end). Detached at once when none is open."""
        still = set(sessions)
        if not still:
            return self._detach_replaced(plugins)
        self.waiting.append((plugins, still))
        return None

    def session_ended(self, session: Any) -> None:
        """Called for every session that ends; detaches each set its last session left."""
        for entry in list(self.waiting):
            plugins, still = entry
            still.discard(session)
            if not still:
                self.waiting.remove(entry)
                self._detach_replaced(plugins)

    def _detach_replaced(self, plugins: list[Any]) -> defer.Deferred[None]:
        log.info(
            "detaching the {count} plugins a reload replaced ({names}): no session uses them",
            count=len(plugins),
            names=" ".join(getattr(plugin, "name", "?") for plugin in plugins),
            event="plugin_detach",
            result="detached",
        )
        return detach_plugins(plugins, self.clock)

    def detach_all(self, running: list[Any]) -> defer.Deferred[None]:
        """At shutdown: the sets still waiting and the running one, all at once."""
        everything = [plugin for plugins, _ in self.waiting for plugin in plugins]
        self.waiting = []
        return detach_plugins([*everything, *running], self.clock)
