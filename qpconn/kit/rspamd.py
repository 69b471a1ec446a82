"""rspamd's own HTTP protocol (``POST /checkv2``): the request and the answer, for the
``rspamd`` plugin.

Why HTTP and not the milter protocol: the normal worker answers ``/checkv2`` directly,
with the envelope in request headers and the verdict as one JSON object. That is what
rspamc, Haraka and Exim speak; the milter protocol needs rspamd's proxy worker in front.

The request (rspamd's protocol documentation names these headers): ``From`` (the envelope
sender, ``<>`` for a bounce), one ``Rcpt`` per recipient, ``IP``, ``Helo``, ``Hostname``
(the client's verified name, ``unknown`` when reverse DNS found none), ``Queue-Id``,
``User`` (after AUTH), ``MTA-Name`` (our name, for rspamd's Authentication-Results) and
``Settings-ID`` when configured; the body is the message as we store it.

The answer: ``action`` (``reject``, ``soft reject``, ``rewrite subject``, ``add header``,
``greylist``, ``no action``), ``score``, ``required_score``, ``symbols`` (name -> an
object with its ``score``), ``messages.smtp_message``, ``subject`` (the new Subject for
``rewrite subject``), ``milter.add_headers`` / ``milter.remove_headers`` and
``dkim-signature``. :func:`parse_answer` checks every field it uses and turns anything
else into an :class:`~qpconn.kit.scanclient.ScanError`, so the plugin applies its failure
policy rather than a half-read verdict.

Twisted's own :class:`~twisted.web.client.Agent` does the HTTP, one connection per scan:
a kept-alive connection that rspamd closed while idle would fail the next POST (which an
HTTP client must not retry), and on loopback a connection costs next to nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from qpconn.kit.scanclient import ScanError, endpoint

__all__ = ["ACTIONS", "RspamdAnswer", "RspamdClient", "parse_answer", "request_headers"]

#: every action rspamd 3 can return (``discard`` and ``quarantine`` come from force_actions)
ACTIONS = ("reject", "soft reject", "rewrite subject", "add header", "greylist", "no action",
           "discard", "quarantine")  # fmt: skip
#: the largest answer read (a verdict with every symbol and its options is a few KB)
MAX_ANSWER = 1 << 20


@dataclass(frozen=True)
class RspamdAnswer:
    """What rspamd said about one message (only the fields the plugin uses, checked)."""

    action: str
    score: float
    required: float
    #: symbol name -> its score, in rspamd's order
    symbols: dict[str, float]
    smtp_message: str | None = None
    subject: str | None = None
    #: field name -> [(value, order)], from ``milter.add_headers``
    add_headers: dict[str, list[tuple[str, int | None]]] = field(default_factory=dict)
    #: field name -> which one (0: every one, 1: the first, -1: the last), ``remove_headers``
    remove_headers: dict[str, int] = field(default_factory=dict)
    dkim_signatures: tuple[str, ...] = ()
    skipped: bool = False


def _number(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScanError(f"rspamd answer without a numeric {key!r}")
    return float(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _added(raw: Any) -> dict[str, list[tuple[str, int | None]]]:
    """``milter.add_headers``: ``"name": "value"``, ``{"value", "order"}`` or a list of them."""
    if not isinstance(raw, dict):
        return {}
    added: dict[str, list[tuple[str, int | None]]] = {}
    for name, spec in raw.items():
        for item in spec if isinstance(spec, list) else [spec]:
            if isinstance(item, str):
                added.setdefault(name, []).append((item, None))
            elif isinstance(item, dict) and isinstance(item.get("value"), str):
                order = item.get("order")
                order = order if isinstance(order, int) and not isinstance(order, bool) else None
                added.setdefault(name, []).append((item["value"], order))
    return added


def parse_answer(data: bytes) -> RspamdAnswer:
    """The verdict in a ``/checkv2`` answer; ScanError if it is an error or no verdict."""
    try:
        parsed = json.loads(data)
    except ValueError:
        raise ScanError(f"rspamd answer is not JSON: {data[:80]!r}") from None
    if not isinstance(parsed, dict):
        raise ScanError("rspamd answer is not a JSON object")
    if "error" in parsed:
        raise ScanError(f"rspamd error: {str(parsed['error'])[:200]}")
    action = parsed.get("action")
    if action not in ACTIONS:
        raise ScanError(f"rspamd answer with an unknown action {str(action)[:40]!r}")
    symbols: dict[str, float] = {}
    raw_symbols = parsed.get("symbols")
    if isinstance(raw_symbols, dict):
        for name, detail in raw_symbols.items():
            score = detail.get("score") if isinstance(detail, dict) else None
            valid = isinstance(score, int | float) and not isinstance(score, bool)
            symbols[str(name)] = float(score) if valid else 0.0
    messages = parsed.get("messages")
    milter = parsed.get("milter") if isinstance(parsed.get("milter"), dict) else {}
    removed = milter.get("remove_headers")
    signatures = parsed.get("dkim-signature")
    if isinstance(signatures, str):
        signatures = [signatures]
    return RspamdAnswer(
        action=action,
        score=_number(parsed, "score"),
        required=_number(parsed, "required_score"),
        symbols=symbols,
        smtp_message=_text(messages.get("smtp_message")) if isinstance(messages, dict) else None,
        subject=_text(parsed.get("subject")),
        add_headers=_added(milter.get("add_headers")),
        remove_headers={
            str(name): which
            for name, which in (removed.items() if isinstance(removed, dict) else [])
            if isinstance(which, int) and not isinstance(which, bool)
        },
        dkim_signatures=tuple(s for s in signatures or [] if isinstance(s, str) and s),
        skipped=parsed.get("is_skipped") is True,
    )


def request_headers(transaction: Any, me: str, settings_id: str | None = None) -> Headers:
    """The envelope as rspamd's request headers (see the module docstring)."""
    connection = transaction.connection
    sender = transaction.sender
    fields: dict[bytes, list[bytes]] = {
        b"From": [(sender.format() if sender is not None else "<>").encode("utf-8")],
        b"Rcpt": [rcpt.format().encode("utf-8") for rcpt in transaction.recipients],
        b"Queue-Id": [transaction.id.encode("ascii", "replace")],
        b"MTA-Name": [me.encode("utf-8")],
    }
    if connection.remote_ip:
        fields[b"IP"] = [connection.remote_ip.encode("ascii")]
    if connection.hello_host:
        fields[b"Helo"] = [connection.hello_host.encode("utf-8")]
    if connection.remote_host and connection.remote_host_verified:
        fields[b"Hostname"] = [connection.remote_host.encode("utf-8")]
    elif connection.remote_host or connection.notes.get("rdns_error"):
        # a name that did not verify is no name (rspamd's HFILTER reads "unknown" so)
        fields[b"Hostname"] = [b"unknown"]
    if connection.auth_user:
        fields[b"User"] = [connection.auth_user.encode("utf-8")]
    if settings_id:
        fields[b"Settings-ID"] = [settings_id.encode("ascii")]
    return Headers(fields)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Every request goes to the configured daemon, whatever the URL says (a unix socket
    has no host name to put in one)."""

    def __init__(self, reactor: Any, address: str, timeout: float) -> None:
        self.reactor, self.address, self.timeout = reactor, address, timeout

    def endpointForURI(self, uri: Any) -> Any:
        return endpoint(self.reactor, self.address, self.timeout)


class _Body(Protocol):
    """Reads a response body up to ``limit`` octets."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self._finish(Failure(ScanError(f"rspamd answer longer than {self.limit} octets")))
            self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        from twisted.web.client import PotentialDataLoss, ResponseDone

        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self._finish(b"".join(self.parts))
        else:
            self._finish(Failure(ScanError(f"rspamd answer cut short: {reason.value}")))

    def _cancel(self, _: defer.Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def _finish(self, result: bytes | Failure) -> None:
        if not self.done.called:
            if isinstance(result, bytes):
                self.done.callback(result)
            else:
                self.done.errback(result)


class RspamdClient:
    """Asks one rspamd normal worker (``host:port`` or a unix socket path) about messages."""

    def __init__(self, reactor: Any, address: str, timeout: float) -> None:
        endpoint(reactor, address, timeout)  # a bad address raises ValueError now
        self.reactor = reactor
        self.address = address
        self.timeout = timeout
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent.usingEndpointFactory(
            reactor, _Endpoints(reactor, address, timeout), pool=pool
        )
        # the Host header rspamd sees; the endpoint factory decides where it really goes
        host = address if not address.startswith(("/", "unix:")) else "localhost"
        self.url = f"http://{host}/checkv2".encode("ascii")

    async def check(self, message: bytes, headers: Headers) -> RspamdAnswer:
        """POST the message; the verdict, or ScanError (unreachable, slow, an error)."""
        asked = defer.Deferred.fromCoroutine(self._post(message, headers))
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            asked.cancel()  # aborts the connection, wherever the exchange is

        # Our own deadline rather than addTimeout: a cancelled request fails with Agent's
        # ResponseNeverReceived (or a cut body), which addTimeout would not call a timeout.
        deadline = self.reactor.callLater(self.timeout, expire)
        try:
            return await asked
        except Exception as exc:  # refused, reset, a malformed HTTP answer, the deadline
            if expired:
                raise ScanError(f"no answer within {self.timeout:g} s") from None
            if isinstance(exc, ScanError):
                raise
            raise ScanError(_describe(exc)) from None
        finally:
            if deadline.active():
                deadline.cancel()

    async def _post(self, message: bytes, headers: Headers) -> RspamdAnswer:
        body = FileBodyProducer(BytesIO(message))
        response = await self.agent.request(b"POST", self.url, headers, body)
        reader = _Body(MAX_ANSWER)
        response.deliverBody(reader)
        data = await reader.done
        if response.code != 200:
            text = data[:200].decode("utf-8", "replace").strip()
            raise ScanError(f"rspamd answered HTTP {response.code}: {text}")
        return parse_answer(data)


def _describe(exc: BaseException) -> str:
    """A one-line reason for Twisted's wrapped failures (ResponseNeverReceived and kin)."""
    reasons = getattr(exc, "reasons", None)
    if reasons:
        exc = reasons[0].value
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
