"""The hook runner: plugins in config order, each result normalised, failures contained.

A hook run stops at the first plugin that does not return DECLINED. Plugins may answer
directly, with a Deferred or from ``async def``; a plugin that answers directly costs no
Deferred at all, which keeps the common, synchronous case cheap. A plugin that raises,
fails or overruns its timeout yields an *error* outcome (the command gets 451) and a
logged traceback; the session and the server carry on.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from qpconn.core.sasl import MECHANISMS
from qpconn.hooks.plugin import HOOKS, HookFunction, Plugin
from qpconn.hooks.results import DECLINED_OUTCOME, DENYSOFT, HookOutcome, Result, normalize
from qpconn.log.level import LevelLogger

if TYPE_CHECKING:
    from qpconn.hooks.tracing import SessionTrace

__all__ = ["HookRunner"]

log = LevelLogger(namespace="qpconn.hooks")

_OK_LIKE = (Result.OK, Result.DONE)

#: what a synchronous plugin returns; isawaitable() (an ABC check) is skipped for these
_PLAIN = frozenset({type(None), Result, tuple})

#: log fields for a failing plugin's line, or a callable returning them
LogContext = dict[str, Any] | Callable[[], dict[str, Any]] | None


class HookRunner:
    """Runs hooks for one plugin list; shared by every session that uses that list."""

    def __init__(
        self, plugins: Sequence[Plugin], clock: IReactorTime, timeout: float = 30.0
    ) -> None:
        self.plugins = list(plugins)
        self.clock = clock
        self.timeout = timeout
        #: ``observer(hook, plugin_name, seconds, outcome)`` after every plugin call, or
        #: None (metrics set it: qpconn.app.metrics); timing costs nothing while it is None
        self.observer: Callable[[str, str, float, HookOutcome], None] | None = None
        self._table: dict[str, list[tuple[Plugin, HookFunction]]] = {hook: [] for hook in HOOKS}
        for plugin in self.plugins:
            for hook, function in plugin.hooks():
                self._table[hook].append((plugin, function))
        #: the hooks some plugin implements: ``hook in runner.used`` is what :meth:`has`
        #: answers, without a call (the session's hot path asks it for every hook)
        self.used: frozenset[str] = frozenset(hook for hook, calls in self._table.items() if calls)
        #: some plugin watches decisions (the deny and ok hooks): only then is each
        #: decision looked at once more, to tell them
        self._watched = not self.used.isdisjoint(("deny", "ok"))
        generic = "auth" in self.used
        #: SASL mechanisms some plugin can judge (its own ``auth-<mech>`` hook, or
        #: ``auth``): what EHLO offers, worked out once rather than per EHLO
        self.auth_mechanisms: tuple[str, ...] = tuple(
            m for m in MECHANISMS if generic or f"auth-{m.lower()}" in self.used
        )

    def has(self, hook: str) -> bool:
        """True when some plugin implements ``hook`` (callers may skip work otherwise)."""
        return hook in self.used

    def plugins_for(self, hook: str) -> list[Plugin]:
        """The plugins that run at ``hook``, in order (for ``check`` and the docs)."""
        return [plugin for plugin, _ in self._table.get(hook, [])]

    async def run(
        self,
        hook: str,
        transaction: Any,
        *args: Any,
        log_context: LogContext = None,
        trace: SessionTrace | None = None,
    ) -> HookOutcome:
        """Run ``hook`` until a plugin decides; DECLINED when none does.

        ``log_context``: fields for the log line of a failing plugin, or a callable that
        returns them (called only then: the common, successful run builds nothing).
        ``trace``: the session's spans (qpconn.hooks.tracing), when tracing is on: each
        plugin call is then a span under the session's or the transaction's.
        """
        for plugin, function in self._table[hook]:
            outcome = self._call(hook, plugin, function, transaction, args, log_context, trace)
            if not isinstance(outcome, HookOutcome):  # (isinstance: mypy narrows it)
                outcome = await outcome  # the plugin answered with an awaitable
            if outcome.result is Result.DECLINED and not outcome.error:
                continue
            if self._watched and hook not in ("deny", "ok"):
                if outcome.error or outcome.result.is_deny:
                    if "deny" in self.used:
                        await self._notify("deny", transaction, outcome, hook, trace)
                elif outcome.result in _OK_LIKE and "ok" in self.used:
                    await self._notify("ok", transaction, outcome, hook, trace)
            return outcome
        return DECLINED_OUTCOME

    async def run_all(
        self, hook: str, transaction: Any, *args: Any, trace: SessionTrace | None = None
    ) -> None:
        """Run every plugin of a notification hook (disconnect, queue_post ...); results ignored."""
        for plugin, function in self._table[hook]:
            outcome = self._call(hook, plugin, function, transaction, args, None, trace)
            if not isinstance(outcome, HookOutcome):
                await outcome

    async def _notify(
        self,
        hook: str,
        transaction: Any,
        outcome: HookOutcome,
        source: str,
        trace: SessionTrace | None,
    ) -> None:
        if self._table[hook]:
            await self.run_all(
                hook,
                transaction,
                outcome.plugin,
                source,
                outcome.result,
                outcome.message,
                trace=trace,
            )

    def _call(
        self,
        hook: str,
        plugin: Plugin,
        function: HookFunction,
        transaction: Any,
        args: tuple[Any, ...],
        log_context: LogContext,
        trace: SessionTrace | None,
    ) -> HookOutcome | Coroutine[Any, Any, HookOutcome]:
        """One plugin's outcome; a coroutine giving it when the plugin answered with an
        awaitable. A plugin that answers directly (most do) costs no coroutine at all."""
        span = trace.hook_started(hook, plugin.name, transaction) if trace is not None else None
        # Timed only for metrics or tracing: the clock costs nothing while both are off.
        started = time.perf_counter() if self.observer is not None or span is not None else None
        try:
            value = function(transaction, *args)
            if type(value) not in _PLAIN and inspect.isawaitable(value):
                return self._settle(hook, plugin, value, log_context, trace, span, started)
            outcome = normalize(value, plugin.name)
        except Exception:
            outcome = self._failed(hook, plugin, log_context, span)
        if started is not None:
            self._observe(hook, plugin, outcome, trace, span, started)
        return outcome

    async def _settle(
        self,
        hook: str,
        plugin: Plugin,
        awaitable: Any,
        log_context: LogContext,
        trace: SessionTrace | None,
        span: Any,
        started: float | None,
    ) -> HookOutcome:
        """The outcome of a plugin that answered with an awaitable (bounded by its timeout)."""
        try:
            outcome = normalize(await self._bounded(awaitable, plugin), plugin.name)
        except Exception:
            outcome = self._failed(hook, plugin, log_context, span)
        if started is not None:
            self._observe(hook, plugin, outcome, trace, span, started)
        return outcome

    def _failed(
        self, hook: str, plugin: Plugin, log_context: LogContext, span: Any
    ) -> HookOutcome:
        """The plugin raised, failed or overran its timeout: logged, and an error outcome."""
        failure = Failure()
        context = log_context() if callable(log_context) else log_context
        log.failure(
            "plugin {plugin} failed in hook {hook}",
            failure,
            plugin=plugin.name,
            hook=hook,
            result="error",
            **(context or {}),
        )
        if span is not None:
            span.record_exception(failure.value)
        return HookOutcome(DENYSOFT, None, plugin.name, error=True)

    def _observe(
        self,
        hook: str,
        plugin: Plugin,
        outcome: HookOutcome,
        trace: SessionTrace | None,
        span: Any,
        started: float,
    ) -> None:
        """Metrics and tracing see the call, timed from its start."""
        seconds = time.perf_counter() - started
        observer = self.observer
        if observer is not None:
            observer(hook, plugin.name, seconds, outcome)
        if span is not None and trace is not None:
            trace.hook_ended(span, outcome, seconds)

    def _bounded(self, awaitable: Any, plugin: Plugin) -> defer.Deferred[Any]:
        """The plugin's awaitable as a Deferred that fails with TimeoutError past its limit."""
        deferred = defer.ensureDeferred(awaitable)
        timeout = plugin.timeout if plugin.timeout is not None else self.timeout
        if timeout and timeout > 0:
            deferred.addTimeout(timeout, self.clock)
        return deferred
