"""Tracing's interface: which spans a session makes, under which parent, with what attributes.

Tracing is optional (``twistd qpconn --tracing``, the ``otel`` extra). The one module that
imports OpenTelemetry is :mod:`qpconn.app.tracing`; it implements the two small protocols
below (:class:`Tracer`, :class:`Span`). Everything else (the factory, the command handlers,
the hook runner) reaches tracing through :class:`SessionTrace`, so that the layers below the
application never import OpenTelemetry, and a server without tracing pays only an
``is not None`` check where a span would start.

The span tree of one connection::

    smtp session                       client.address, qpconn.helo, tls.protocol.version ...
      connect hosts_allow              a hook run: qpconn.hook, qpconn.plugin, qpconn.result
      ehlo helo
      smtp transaction                 qpconn.queue_id, qpconn.result, qpconn.reply_code ...
        mail ...  rcpt rcpt_ok  ...  queue queue/maildir
      smtp transaction
        ...
      disconnect ...

A transaction span runs from the first MAIL of a transaction to its end (the end of the
message, RSET, a new HELO/EHLO, or the disconnect); a hook runs under the transaction span
when it judges that transaction, under the session span otherwise (``connect``, ``helo``,
``auth``, ``disconnect``, ...). One hook span is one plugin's answer to one hook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from qpconn.hooks.results import HookOutcome

__all__ = ["AttributeValue", "Span", "Tracer", "SessionTrace"]

#: what a span attribute may hold (OpenTelemetry's primitive types)
AttributeValue = str | bool | int | float | Sequence[str]


class Span(Protocol):
    """One span under way, as a tracing back end gives it."""

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        """Add or replace attributes."""

    def add_event(self, name: str, attributes: Mapping[str, AttributeValue]) -> None:
        """Something that happened at one moment inside the span (a refusal)."""

    def record_exception(self, exception: BaseException) -> None:
        """An exception raised inside the span (a failing plugin's)."""

    def set_error(self, description: str) -> None:
        """Mark the span as failed: the work it stands for did not complete."""

    def end(self) -> None:
        """The span is over; nothing is added to it afterwards."""


class Tracer(Protocol):
    """What a tracing back end provides: spans, as roots or children of another."""

    def start_span(
        self, name: str, parent: Span | None, attributes: Mapping[str, AttributeValue]
    ) -> Span:
        """A span that starts now, under ``parent`` (a new trace when None)."""


def _peer_attributes(connection: Any) -> dict[str, AttributeValue]:
    """The connection's two ends, under OpenTelemetry's general attribute names."""
    attributes: dict[str, AttributeValue] = {"qpconn.conn_id": connection.id}
    for key, value in (
        ("client.address", connection.remote_ip),
        ("client.port", connection.remote_port),
        ("server.address", connection.local_ip),
        ("server.port", connection.local_port),
    ):
        if value is not None:
            attributes[key] = value
    return attributes


def _session_attributes(connection: Any) -> dict[str, AttributeValue]:
    """What the session learnt: the client's names, its greeting, TLS, authentication."""
    attributes = _peer_attributes(connection)  # PROXY or XCLIENT may have changed them
    if connection.remote_host:
        attributes["qpconn.remote_host"] = connection.remote_host
    if connection.hello_host is not None:
        attributes["qpconn.hello"] = connection.hello or ""
        attributes["qpconn.helo"] = connection.hello_host
    tls = connection.tls
    if tls:
        version = tls.get("version", "")
        attributes["tls.protocol.name"] = "tls"
        attributes["tls.protocol.version"] = version.removeprefix("TLSv")
        attributes["tls.cipher"] = tls.get("cipher", "")
    if connection.auth_mechanism:
        attributes["qpconn.auth.mechanism"] = connection.auth_mechanism
    return attributes


class SessionTrace:
    """The spans of one session: its own, its current transaction's, its hook runs'.

    Made by the factory when a session starts (only while a tracer is set) and kept by
    the session's command handlers (:attr:`qpconn.smtp.context.CommandContext.trace`),
    which hand it to every hook run (:meth:`qpconn.hooks.runner.HookRunner.run`).
    """

    __slots__ = ("_decided", "_transaction", "_transaction_span", "span", "tracer", "transactions")

    def __init__(self, tracer: Tracer, connection: Any) -> None:
        self.tracer = tracer
        self.span = tracer.start_span("smtp session", None, _peer_attributes(connection))
        #: transaction spans begun in this session
        self.transactions = 0
        self._transaction: Any = None
        self._transaction_span: Span | None = None
        self._decided = False

    # -- hook runs ----------------------------------------------------------------------
    def hook_started(self, hook: str, plugin: str, transaction: Any) -> Span:
        """The span of one plugin's run of ``hook``, under the span of what it judges."""
        parent = self._transaction_span if transaction is self._transaction else None
        return self.tracer.start_span(
            f"{hook} {plugin}",
            parent or self.span,
            {"qpconn.hook": hook, "qpconn.plugin": plugin},
        )

    def hook_ended(self, span: Span, outcome: HookOutcome, seconds: float) -> None:
        """The plugin answered (or failed: the span's status is then an error)."""
        result = "error" if outcome.error else outcome.result.name
        span.set_attributes({"qpconn.result": result, "qpconn.latency": seconds})
        if outcome.error:
            span.set_error(f"plugin {outcome.plugin} failed")
        span.end()

    # -- transactions -------------------------------------------------------------------
    def transaction_started(self, transaction: Any) -> None:
        """MAIL: the transaction's span starts, unless an earlier MAIL of it began one."""
        if transaction is self._transaction:
            return
        self.transaction_ended(self._transaction, "abandoned")
        self.transactions += 1
        self._transaction = transaction
        self._decided = False
        self._transaction_span = self.tracer.start_span(
            "smtp transaction", self.span, {"qpconn.queue_id": transaction.id}
        )

    def transaction_decided(
        self, transaction: Any, result: str, code: int, hook: str, plugin: str | None
    ) -> None:
        """The end of DATA was answered: what was decided, where, and by whom."""
        span = self._transaction_span
        if span is None or transaction is not self._transaction:
            return
        attributes: dict[str, AttributeValue] = {
            "qpconn.result": result,
            "qpconn.reply_code": code,
            "qpconn.hook": hook,
        }
        if plugin:
            attributes["qpconn.plugin"] = plugin
        span.set_attributes(attributes)
        self._decided = True

    def refused(self, transaction: Any, stage: str, code: int, plugin: str | None) -> None:
        """A sender or recipient was refused: an event on the transaction's span."""
        span = self._transaction_span
        if span is not None and transaction is self._transaction:
            span.add_event(f"{stage} refused", {"qpconn.reply_code": code,
                                                 "qpconn.plugin": plugin or "-"})  # fmt: skip

    def transaction_ended(self, transaction: Any, result: str) -> None:
        """The transaction is over. Its ``qpconn.result`` is the verdict at the end of DATA
        when there was one, else ``result``: how it ended without one (``reset``: RSET or
        a new HELO; ``disconnect``; ``abandoned``: a MAIL of a newer transaction)."""
        span = self._transaction_span
        if span is None or transaction is not self._transaction:
            return
        self._transaction = self._transaction_span = None
        attributes: dict[str, AttributeValue] = {
            "qpconn.recipients": len(transaction.recipients),
            "qpconn.size": transaction.data_size,
        }
        if not self._decided:
            attributes["qpconn.result"] = result
        span.set_attributes(attributes)
        span.end()

    # -- the session --------------------------------------------------------------------
    def session_ended(self, connection: Any) -> None:
        """The connection is gone: what the session learnt goes on its span, which ends."""
        if self._transaction is not None:
            self.transaction_ended(self._transaction, "disconnect")
        attributes = _session_attributes(connection)
        attributes["qpconn.transactions"] = self.transactions
        self.span.set_attributes(attributes)
        self.span.end()
