"""One AMQP 0-9-1 connection to a broker (RabbitMQ), kept up in the background, for publishing
with publisher confirms. Used by ``queue/amqp``; needs pika (``pip install 'qpconn[amqp]'``).

Why pika's Twisted adapter (``TwistedProtocolConnection``): it is the maintained AMQP client
with a Twisted transport, so frames are read and written by our reactor and a publish is a
Deferred that fires on the broker's ``basic.ack``; no thread, no second event loop.

The link's states and what a publish meets in each:

* *connecting* (the first message, or after a loss): the publish waits for the attempt
  in progress, within its own timeout;
* *ready*: the message is published on the one confirm-mode channel;
* *down* (the last attempt failed, the next one is scheduled): the publish fails at once
  with :class:`BrokerUnavailable`, so a broker that is down costs a client a 451, not a
  wait. The next attempt comes after a delay doubling from ``retry_min`` to ``retry_max``
  seconds and reset by a success: a down broker is not hammered, and one that is back is
  used again within ``retry_max`` seconds at most, without any message having to ask.

A lost connection, a channel closed by the broker (a refused declaration, an exchange
that does not exist) and a failed attempt all lead to *down* and a new attempt; pika fails
every publish still waiting for its confirm when that happens (:class:`ChannelClosed` or
:class:`ConnectionClosed`).

Returned messages: pika's Twisted channel keeps only the last ``basic.return`` and pins it
on the next confirm, and RabbitMQ may confirm several messages with one ``basic.ack``
(``multiple``), so a return could be pinned on another message and the returned one look
confirmed. The link therefore records every return by ``message_id`` itself: the broker
sends a message's return before its ack, so once a publish is confirmed it is known
whether that very message was returned (:class:`Unroutable`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import pika
from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from pika.exceptions import NackError, UnroutableError
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol

from qpconn.client.names import resolving_reactor

__all__ = ["BrokerLink", "BrokerUnavailable", "Unroutable", "Refused", "describe"]

#: returns kept while their publishes wait for the ack; past it the oldest are forgotten
_RETURNS_KEPT = 4096


class BrokerUnavailable(Exception):
    """The broker cannot be used now (down, unreachable, or the link is being rebuilt)."""


class Unroutable(Exception):
    """The broker returned the message: no queue is bound to where it was published."""


class Refused(Exception):
    """The broker refused the message (``basic.nack``)."""


Setup = Callable[[TwistedChannel], Awaitable[Any]]


class BrokerLink:
    """An AMQP connection with one confirm-mode channel; see the module docstring.

    ``setup`` runs on each new channel before it is used (to declare the queue), so a
    broker restarted without its definitions gets them back on the next connection.
    """

    def __init__(
        self,
        url: str,
        setup: Setup,
        reactor: Any,
        log: Any,
        connect_timeout: float = 10.0,
        retry_min: float = 0.5,
        retry_max: float = 15.0,
        resolver: Any = None,
    ) -> None:
        self.parameters = pika.URLParameters(url)
        self.host, self.port = self.parameters.host, self.parameters.port
        #: where the broker is, for logs and replies (no credentials)
        self.label = f"{self.host}:{self.port}"
        self.setup, self.reactor, self.log = setup, reactor, log
        #: an IResolver for the broker's host name (``--dns-server``), or None: the system's
        self.resolver = resolver
        self.connect_timeout = connect_timeout
        self.retry_min, self.retry_max = retry_min, retry_max
        self.state = "idle"
        #: why the link is down (for the 451 text)
        self.reason = ""
        self.failures = 0
        self.channel: TwistedChannel | None = None
        self.connection: TwistedProtocolConnection | None = None
        self._waiting: list[defer.Deferred[TwistedChannel]] = []
        self._retry: Any = None
        self._returned: OrderedDict[str, str] = OrderedDict()
        self._trigger: Any = None
        self.closed = False

    # -- the connection -------------------------------------------------------------------
    def start(self) -> None:
        """Connect unless connected or connecting (idempotent)."""
        if self.closed or self.state in ("connecting", "ready"):
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self.state = "connecting"
        if self._trigger is None and hasattr(self.reactor, "addSystemEventTrigger"):
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.close)
        attempt = defer.Deferred.fromCoroutine(self._connect())
        attempt.addTimeout(self.connect_timeout, self.reactor)
        attempt.addCallbacks(self._ready, self._failed)

    async def _connect(self) -> TwistedChannel:
        named = resolving_reactor(self.reactor, self.resolver)
        endpoint = HostnameEndpoint(named, self.host, self.port, self.connect_timeout)
        protocol = TwistedProtocolConnection(self.parameters, custom_reactor=self.reactor)
        self.connection = protocol
        try:
            await connectProtocol(endpoint, protocol)
            await protocol.ready
            channel = await protocol.channel()
            returned: OrderedDict[str, str] = OrderedDict()
            channel.add_on_return_callback(lambda message: self._on_return(returned, message))
            await channel.confirm_delivery()
            await self.setup(channel)
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            raise
        self._returned = returned
        return channel

    def _ready(self, channel: TwistedChannel) -> None:
        connection = self.connection
        if self.closed or connection is None:  # closed while connecting
            if connection is not None and connection.transport is not None:
                connection.transport.abortConnection()
            return
        self.state, self.channel, self.failures, self.reason = "ready", channel, 0, ""
        self.log.info("AMQP broker {broker}: connected", broker=self.label)
        channel.on_closed.addBoth(self._lost, "channel closed", channel)
        if connection.closed is not None:
            connection.closed.addBoth(self._lost, "connection lost", channel)
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(channel)

    def _failed(self, failure: Any) -> None:
        self.connection = None
        reason = "timed out" if failure.check(defer.TimeoutError) else describe(failure.value)
        self._down(f"cannot connect: {reason}")

    def _lost(self, result: Any, what: str, channel: TwistedChannel) -> None:
        if channel is not self.channel:  # an old channel's close, already dealt with
            return
        self.channel = None
        connection, self.connection = self.connection, None
        if connection is not None and not connection.is_closed:
            connection.transport.abortConnection()  # the channel went: start afresh
        if not self.closed:
            self._down(f"{what}: {describe(getattr(result, 'value', result))}")

    def _down(self, reason: str) -> None:
        self.state, self.reason = "down", reason
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.errback(BrokerUnavailable(reason))
        if self.closed:
            return
        delay = min(self.retry_max, self.retry_min * 2**self.failures)
        self.failures += 1
        self.log.warn(
            "AMQP broker {broker}: {reason}; next attempt in {delay:.1f}s",
            broker=self.label,
            reason=reason,
            delay=delay,
        )
        self._retry = self.reactor.callLater(delay, self.start)

    def close(self) -> defer.Deferred[Any]:
        """Stop reconnecting and close the connection (at shutdown; idempotent)."""
        self.closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, AttributeError):
                pass
            self._trigger = None
        connection, self.connection, self.channel = self.connection, None, None
        if connection is None or connection.is_closed:
            return defer.succeed(None)
        closed = connection.close()
        if closed is None:  # still handshaking: nothing to close politely
            if connection.transport is not None:
                connection.transport.abortConnection()
            return defer.succeed(None)
        return closed.addTimeout(2.0, self.reactor).addErrback(lambda _: None)

    # -- publishing -----------------------------------------------------------------------
    async def ready_channel(self) -> TwistedChannel:
        """The ready channel, or the one being connected; BrokerUnavailable when down."""
        if self.state == "idle":
            self.start()
        if self.state == "ready" and self.channel is not None:
            return self.channel
        if self.state == "connecting":
            waiter: defer.Deferred[TwistedChannel] = defer.Deferred()
            self._waiting.append(waiter)
            return await waiter
        raise BrokerUnavailable(self.reason or "not connected")

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties
    ) -> None:
        """Publish (mandatory) and return once the broker confirmed the message.

        Raises :class:`BrokerUnavailable` (also when the link fails before the confirm),
        :class:`Refused` or :class:`Unroutable`. The caller bounds the wait.
        """
        channel = await self.ready_channel()
        returned = self._returned
        message_id = str(properties.message_id)
        try:
            await channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
        except NackError as exc:
            raise Refused("the broker refused the message (nack)") from exc
        except UnroutableError:
            pass  # perhaps pinned on us for another message: our own record decides
        except (pika.exceptions.AMQPError, error.ConnectionClosed, OSError) as exc:
            raise BrokerUnavailable(f"lost before the confirm: {describe(exc)}") from exc
        reason = returned.pop(message_id, None)
        if reason is not None:
            raise Unroutable(reason)

    def _on_return(self, returned: OrderedDict[str, str], message: Any) -> None:
        method = message.method
        message_id = str(message.properties.message_id)
        returned[message_id] = f"{method.reply_code} {method.reply_text}"
        while len(returned) > _RETURNS_KEPT:
            returned.popitem(last=False)


def describe(error: Any) -> str:
    """A short reason for logs and 451 texts: pika's exceptions print as tuples."""
    if isinstance(error, pika.exceptions.ConnectionClosed | pika.exceptions.ChannelClosed):
        return f"{error.reply_code} {error.reply_text}"
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]
