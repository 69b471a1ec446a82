"""queue/fork PATH [-- PATH ...]: deliver one accepted message along several queue paths.

Each PATH is a queue plugin line, as it would appear in ``config/plugins``; ``--``
separates them::

    queue/fork queue/maildir /archive -- queue/maildir /inbox

Every path's plugin is loaded once, when the server starts (a bad path stops the start,
as any bad plugin line does). At ``queue`` time the paths run concurrently, each with

* its own ``connection.clone(no_reset=True)`` (the session's connection is untouched), and
* its own view of the transaction: same envelope and queue id, the stored body shared
  read-only, but its own ``notes`` (starting as a copy of the transaction's), its own
  header object and recipient list, and ``close()`` disabled -- so what one path writes
  (notes, header fields, removed recipients) never leaks into another path or back into
  the session.

Policy (what the client is told):

1. Every path accepted (OK, or DONE with a 2xx reply) -> 250 ``Queued as ID``.
2. No path accepted and every path refused permanently (5xx) -> the first path's
   permanent refusal: the message is stored nowhere, so a bounce is the truth.
3. Anything else -- a temporary failure, a path that declined, failed or timed out, or
   a mix of accepted and refused paths -> a temporary failure: the first failing path's
   own reply if it is 4xx, else ``452 4.3.0`` (DENYSOFT at queue). The client keeps the
   message and retries.
   When some paths had already accepted, they receive the message again on the retry
   (a duplicate, never a loss: duplicates are the price of not losing mail on the path
   that failed). Such a partial delivery is logged as an error naming every path.

Paths run to the end even when another fails: a path that can store the message should,
so that only the failing one is retried. Each path is bounded by its plugin's timeout (or
``plugin_timeout``); this plugin's own timeout is set above the longest of them.

``transaction.notes["fork"]`` receives one summary per path (name, reply code and text)
for ``queue_post`` plugins and logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from twisted.internet import defer

from qpconn.core.reply import Reply
from qpconn.hooks.results import DENY, DENYSOFT, DONE, OK, HookOutcome, Result, reply_for
from qpconn.hooks.runner import HookRunner
from qpconn.mail.connection import Notes
from qpconn.mail.header import Header
from qpconn.mail.transaction import Transaction
from qpconn.plugins import Plugin, PluginLoadError, load_plugin

__all__ = ["Fork", "PathTransaction", "split_paths"]

SEPARATOR = "--"


def split_paths(args: Sequence[str]) -> list[list[str]]:
    """``a x -- b y`` -> ``[["a", "x"], ["b", "y"]]``; an empty path is an error."""
    paths: list[list[str]] = [[]]
    for arg in args:
        if arg == SEPARATOR:
            paths.append([])
        else:
            paths[-1].append(arg)
    if not args or any(not path for path in paths):
        raise ValueError(
            "expects queue paths separated by --, e.g. "
            "queue/fork queue/maildir /archive -- queue/maildir /inbox"
        )
    return paths


class PathTransaction(Transaction):
    """One path's view of the accepted transaction.

    It shares the stored body with the session's transaction (read-only: a path must not
    add text) but owns notes, header, recipients and connection. ``close()`` does nothing:
    the body, and any spool file, belong to the session, which closes them once.
    """

    @classmethod
    def of(cls, original: Transaction) -> PathTransaction:
        view = cls.__new__(cls)
        view.__dict__.update(original.__dict__)  # a shallow copy without Transaction.__init__
        view.notes = Notes(original.notes)
        view.header = Header(original.header.as_bytes()) if original.header is not None else None
        view.recipients = list(original.recipients)
        view.mail_params = dict(original.mail_params)
        if original.connection is not None:
            view.connection = original.connection.clone(no_reset=True)
        return view

    def body_write(self, data: bytes) -> bool:
        raise RuntimeError("a forked delivery path cannot change the message text")

    def close(self) -> None:
        """Leave the shared body alone; the session's transaction releases it."""


@dataclass
class _Path:
    """A loaded path: its label for logs, its plugin and a runner for its queue hook."""

    label: str
    plugin: Plugin
    runner: HookRunner


class Fork(Plugin):
    """Queue plugin delivering along several queue paths; see the module docstring."""

    def register(self, *args: str) -> None:
        from twisted.internet import reactor

        default_timeout = self.config.get_float("plugin_timeout", 30.0)
        self.paths: list[_Path] = []
        for number, words in enumerate(split_paths(args), 1):
            try:
                plugin = load_plugin(self.config, words[0], *words[1:])
            except PluginLoadError as exc:
                raise ValueError(f"path {number}: {exc}") from exc
            if not any(hook == "queue" for hook, _ in plugin.hooks()):
                raise ValueError(f"path {number}: {words[0]} has no queue hook")
            runner = HookRunner([plugin], reactor, default_timeout)  # type: ignore[arg-type]
            self.paths.append(_Path(f"{number}:{' '.join(words)}", plugin, runner))
        longest = max(
            (p.plugin.timeout if p.plugin.timeout is not None else default_timeout)
            for p in self.paths
        )
        # Paths time out (and are reported) before the whole fork does; 0 means unbounded.
        self.timeout = longest + 5.0 if longest > 0 else 0.0

    async def hook_queue(self, transaction: Transaction) -> tuple[Result, str]:
        views = [PathTransaction.of(transaction) for _ in self.paths]
        try:
            outcomes: list[HookOutcome] = await defer.gatherResults(
                [
                    defer.Deferred.fromCoroutine(path.runner.run("queue", view))
                    for path, view in zip(self.paths, views, strict=True)
                ],
                consumeErrors=True,
            )
        finally:
            for view in views:
                if view.connection is not None:
                    view.connection.reset()
        replies = [_reply(outcome) for outcome in outcomes]
        transaction.notes["fork"] = [
            {"path": path.label, "code": reply.code, "text": reply.text}
            for path, reply in zip(self.paths, replies, strict=True)
        ]
        return self._verdict(transaction, replies)

    def _verdict(self, transaction: Transaction, replies: list[Reply]) -> tuple[Result, str]:
        """Apply the module docstring's policy to the paths' replies."""
        accepted = [r.code < 300 for r in replies]
        if all(accepted):
            return OK, f"2.0.0 Queued as {transaction.id}"
        failures = [(p, r) for p, r in zip(self.paths, replies, strict=True) if r.code >= 300]
        if not any(accepted) and all(r.code >= 500 for _, r in failures):
            path, reply = failures[0]
            self._log_failure(transaction, path, reply, accepted=[])
            return DENY, _line(reply)
        temporary = [(p, r) for p, r in failures if 400 <= r.code < 500]
        path, reply = temporary[0] if temporary else failures[0]
        done = [p.label for p, ok in zip(self.paths, accepted, strict=True) if ok]
        self._log_failure(transaction, path, reply, accepted=done)
        if 400 <= reply.code < 500:
            return DONE, f"{reply.code} {_line(reply)}"
        return DENYSOFT, "4.3.0 Message could not be delivered everywhere; try again later"

    def _log_failure(
        self, transaction: Transaction, path: _Path, reply: Reply, accepted: list[str]
    ) -> None:
        if accepted:
            self.log.error(
                "{queue_id} fork: path {path} failed ({code} {text}) after {accepted} "
                "accepted; the client is told to retry, so those may receive a duplicate",
                queue_id=transaction.id,
                path=path.label,
                code=reply.code,
                text=reply.text,
                accepted=", ".join(accepted),
            )
        else:
            self.log.warn(
                "{queue_id} fork: path {path} failed ({code} {text}); nothing was delivered",
                queue_id=transaction.id,
                path=path.label,
                code=reply.code,
                text=reply.text,
            )


def _reply(outcome: HookOutcome) -> Reply:
    """The reply a path's outcome would have given as the only queue plugin."""
    decided = reply_for("queue", outcome)
    if decided is None:  # OK (or DONE without a reply, which counts as OK): stored
        return Reply(250, outcome.message or "Queued", "2.0.0")
    return decided[0]


def _line(reply: Reply) -> str:
    """A path's reply text with its enhanced code, on one line, for our own reply."""
    text = " ".join(reply.lines)
    return f"{reply.enhanced} {text}" if reply.enhanced else text
