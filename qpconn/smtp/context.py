"""The session context every command handler works with: one session's state, the server's settings.

The Twisted adapter (:class:`~qpconn.server.protocol.SMTPServerProtocol`) builds one
handler object per connection and hands it, explicitly, what the handlers may use: the
server's settings (the factory), the sans-I/O session core, the
:class:`~qpconn.mail.connection.Connection` and the session's logger. The handler owns the
current :class:`~qpconn.mail.transaction.Transaction` from then on. It never sees the
transport: what it decides leaves as replies through the core, which the adapter writes.

:class:`CommandContext` is the base of every handler class
(:class:`~qpconn.smtp.commands.SMTPCommands`, its STARTTLS/AUTH and extension parts, and
LMTP's), so the state they share is declared once, here.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from twisted.logger import LogLevel

from qpconn.core.reply import Reply
from qpconn.hooks.results import DECLINED_OUTCOME, HookOutcome, reply_for
from qpconn.mail.transaction import Transaction

if TYPE_CHECKING:
    from qpconn.config import Config
    from qpconn.core.session import ServerSession
    from qpconn.hooks.runner import HookRunner
    from qpconn.hooks.tracing import SessionTrace
    from qpconn.kit.policy import NetworkList
    from qpconn.log.level import LevelLogger
    from qpconn.mail.connection import Connection
    from qpconn.smtp.limits import SessionLimits
    from qpconn.smtp.security import SecuritySettings

__all__ = ["CommandContext", "HandlerResult", "ServerSettings"]

#: What a handler returns: a Reply, (Reply, close), or None (logged; the client gets 451).
HandlerResult = Reply | tuple[Reply, bool] | None

_TRANSACTION_LINE = (
    "{conn_id} {queue_id} {verdict} from={sender} to={rcpts} size={size} "
    "reply={code} elapsed={elapsed:.3f}s"
)
_REJECTION = "{conn_id} {stage} rejected by {plugin}: {code} {text}"
_CLOSING_REJECTION = _REJECTION + " (closing the connection)"


class ServerSettings(Protocol):
    """What handlers read from the server (an :class:`~qpconn.server.factory.SMTPFactory`)."""

    config: Config
    runner: HookRunner
    me: str
    databytes: int
    size_threshold: int
    spool_dir: str | None
    session_limits: SessionLimits
    security: SecuritySettings
    #: the peers that may use XCLIENT (config ``xclient_hosts``)
    xclient_hosts: NetworkList

    async def lookup_peer(self, connection: Connection) -> None:
        """Fill in rDNS/FCrDNS and ident for ``connection`` (XCLIENT's new address)."""


class CommandContext:
    """One session's state and the helpers every handler uses; see the module docstring.

    ``factory`` gives the server-wide settings, copied onto the handler once (they are read
    on every command); ``session`` is the core, ``connection`` the peer's Connection and
    ``log`` the session's bound logger (the adapter's, so one connection's lines share one
    source).
    """

    #: this session's spans (qpconn.hooks.tracing), set by the factory when a tracer is on;
    #: None otherwise, and then tracing costs one attribute check per hook run
    trace: SessionTrace | None = None

    def __init__(
        self,
        factory: ServerSettings,
        session: ServerSession,
        connection: Connection,
        log: LevelLogger,
    ) -> None:
        self.factory = factory
        self.session = session
        self.connection = connection
        self.log = log
        self.config = factory.config
        self.runner = factory.runner
        self.me = factory.me
        self.databytes = factory.databytes
        self.size_threshold = factory.size_threshold
        self.spool_dir = factory.spool_dir
        self.session_limits = factory.session_limits
        self.security = factory.security
        self._tx_count = 0
        #: a refusal decided before the end of the message (data_headers_end, a full
        #: spool disk, a refused first chunk), given when the message ends
        self._verdict: tuple[Reply, bool] | None = None
        self.transaction = self.new_transaction()

    # -- helpers ------------------------------------------------------------------------
    def log_context(self) -> dict[str, Any]:
        """Fields every log event of this session carries."""
        transaction = self.transaction
        return {
            "conn_id": self.connection.id,
            "txn_id": transaction.id if transaction is not None else None,
            "remote_ip": self.connection.remote_ip,
        }

    async def run_hook(self, hook: str, *args: Any) -> HookOutcome:
        """Run a hook with the current transaction and these arguments."""
        runner = self.runner
        if hook not in runner.used:
            return DECLINED_OUTCOME  # most hooks have no plugin: nothing to run or log
        return await runner.run(
            hook, self.transaction, *args, log_context=self.log_context, trace=self.trace
        )

    def new_transaction(self) -> Transaction:
        """A fresh transaction; its id (the queue id) is the connection id plus a counter."""
        self._tx_count += 1
        return Transaction(
            self.connection,
            id=f"{self.connection.id}.{self._tx_count}",
            size_threshold=self.size_threshold,
            spool_dir=self.spool_dir,
        )

    async def reset_transaction(self) -> None:
        """End the current transaction (RSET, new HELO, end of DATA) and start a new one."""
        await self.end_transaction(self.transaction)
        self.transaction = self.new_transaction()

    async def end_transaction(self, old: Transaction) -> None:
        """Run reset_transaction hooks for a transaction that had an envelope; release it."""
        trace = self.trace
        if (old.sender is not None or old.recipients) and self.runner.has("reset_transaction"):
            await self.runner.run_all("reset_transaction", old, trace=trace)
        if trace is not None:
            trace.transaction_ended(old, "reset")
        old.close()
        self._verdict = None

    async def close(self) -> None:
        """The connection is gone: disconnect hooks, then the transaction is released."""
        trace = self.trace
        if trace is not None:  # a transaction under way ends with the connection
            trace.transaction_ended(self.transaction, "disconnect")
        try:
            runner = self.runner
            for hook in ("disconnect", "post-connection"):
                if runner.has(hook):
                    await runner.run_all(hook, self.transaction, trace=trace)
        finally:
            self.transaction.close()

    # -- what every handler class answers ----------------------------------------------------
    async def unrecognized_command(self, verb: str, arg: str) -> HandlerResult:
        """A verb with no handler (or one this server does not offer): the hook, else 500."""
        outcome = await self.run_hook("unrecognized_command", verb, arg)
        decided = reply_for("unrecognized_command", outcome)
        if decided is None:
            return Reply(500, "5.5.1 Unrecognized command")
        if outcome.plugin is not None:  # a plugin's refusal (count_unrecognized_commands' 521
            # closes the session): the log must say who and why
            self.log_rejection("unrecognized_command", outcome, decided[0], closing=decided[1])
        return decided

    # -- logging --------------------------------------------------------------------------
    def log_rejection(
        self, stage: str, outcome: HookOutcome, reply: Reply, closing: bool = False, **fields: Any
    ) -> None:
        """One line for a command a plugin refused (``event`` ``rejection``); ``closing``
        when the refusal ends the session, which the line then says."""
        self.log.info(
            _CLOSING_REJECTION if closing else _REJECTION,
            stage=stage,
            closing=closing,
            hook=stage,
            event="rejection",
            result="rejected",
            plugin=outcome.plugin or "-",
            code=reply.code,
            text=reply.text,
            **fields,
            **self.log_context(),
        )
        if self.trace is not None:
            self.trace.refused(self.transaction, stage, reply.code, outcome.plugin)

    def log_limit(self, stage: str, limit: str, reply: Reply, **fields: Any) -> None:
        """One line for a command refused by a limit of the server itself, not a plugin
        (``SIZE=`` over ``databytes``, a recipient past ``max_rcpt``): ``event``
        ``rejection`` with ``limit`` naming the setting."""
        self.log.info(
            "{conn_id} {stage} refused by the {limit} limit: {code} {text}",
            stage=stage,
            hook=stage,
            event="rejection",
            result="rejected",
            plugin="-",
            limit=limit,
            code=reply.code,
            text=reply.text,
            **fields,
            **self.log_context(),
        )

    def log_transaction(
        self,
        verdict: str,
        reply: Reply,
        plugin: str | None = None,
        hook: str = "queue",
        size: int | None = None,
    ) -> None:
        """The one summary line of a transaction that reached the end of DATA (``event``
        ``transaction``); ``hook`` is where it was decided. Metrics count these events.

        ``size`` is the size received when it differs from what was stored: an oversized
        message's text past ``databytes`` is read and dropped, never stored."""
        txn = self.transaction
        started = txn.notes.get("data_started")
        recipients = txn.recipients
        # One dict, handed over as the event itself (info(**fields) would copy it again).
        fields = {
            **self.log_context(),
            "queue_id": txn.id,
            "verdict": verdict,
            "sender": txn.sender.format() if txn.sender else "<>",
            "rcpts": ",".join([r.format() for r in recipients]),
            "size": txn.data_size if size is None else size,
            "code": reply.code,
            "plugin": plugin,
            "hook": hook,
            "result": verdict,
            "recipients": len(recipients),
            "event": "transaction",
            "elapsed": (time.monotonic() - started) if started else 0.0,
        }
        self.log.emit_fields(LogLevel.info, _TRANSACTION_LINE, fields)
        if self.trace is not None:
            self.trace.transaction_decided(txn, verdict, reply.code, hook, plugin)
