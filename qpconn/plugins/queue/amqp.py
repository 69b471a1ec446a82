"""queue/amqp [URL] [option=value ...]: publish each message to a RabbitMQ queue, 250 on confirm.

The message (our ``Received`` field, the header, the body: the text ``queue/maildir``
stores, without its ``Return-Path``/``Delivered-To`` lines) is the body of one persistent
AMQP message (``delivery_mode`` 2), and the envelope travels in its headers
(:func:`envelope_headers`; every name and type is in docs/config.md), so a consumer in
any language gets the message as it came and who it is for. The channel is in
publisher-confirm mode and the message is published ``mandatory``: the client hears 250
only after the broker's ``basic.ack`` for it, i.e. once the queue has it on disk (a quorum
queue: on a majority of its nodes). A broker that is down, a ``basic.nack``, a message
returned as unroutable, or no confirm within ``timeout`` seconds all give 451: nothing is
acknowledged that the broker did not take, and the client retries. After a timeout the
broker may still take the message, so the retry can make a duplicate: never a loss.

Why the default queue type is ``classic`` (durable): tried by hand against Debian 12's
RabbitMQ 3.10.8 (a broker SIGKILLed seconds after the first message), a classic queue comes back
with every confirmed message, while a quorum queue killed within its first minutes did not
come back at all: its Ra member is registered in a file that is only written out every few
minutes, so after the restart the queue exists but has no leader, and every publish waits
a minute and is then refused (nack). A quorum queue that has been through one clean restart survives
SIGKILL as well. On a single broker (a mail hub's usual setup) a quorum queue adds nothing
but that risk; on a cluster of RabbitMQ nodes it is what keeps a node's loss from being a
loss of mail (Raft: a message is confirmed once a majority of its nodes wrote it, while a
classic queue lives on one node), so there use ``queue_type=quorum`` and create the queue
ahead of the first message (``declare=no``, or restart the broker once after declaring).

Options: ``queue=NAME`` (default ``qpconn``), ``queue_type=classic|quorum``,
``exchange=NAME`` (default the default exchange) and ``routing_key=KEY`` (default the
queue's name), ``declare=yes|no`` (declare the durable queue, and bind it to ``exchange``,
on every new connection; ``no`` when the broker's administrator owns the definitions),
``timeout=SECONDS`` (default 30) for one message, connecting included.

Needs pika: ``pip install 'qpconn[amqp]'``. The connection is made at the first message and
kept; when it is lost it is made again in the background (:mod:`qpconn.client.amqp`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from qpconn.hooks.plugin import Plugin
from qpconn.hooks.results import DONE, OK, Result
from qpconn.kit.threads import run_in_pool, worker_pool

try:
    import pika

    from qpconn.client.amqp import BrokerLink, BrokerUnavailable, Refused, Unroutable, describe
except ModuleNotFoundError as exc:  # pika is an extra
    if not (exc.name or "").startswith("pika"):
        raise
    pika = None  # type: ignore[assignment]

__all__ = ["AMQP", "envelope_headers", "DEFAULT_URL"]

#: RabbitMQ's own default: its guest user may log in from loopback only
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
QUEUE_TYPES = ("classic", "quorum")
OPTIONS = ("queue", "queue_type", "exchange", "routing_key", "declare", "timeout")


def envelope_headers(transaction: Any, me: str) -> dict[str, Any]:
    """The AMQP headers of one message: the SMTP envelope and where it came from.

    Strings are AMQP long strings (UTF-8); absent values are empty strings, so that every
    header is always there with one type. Documented in docs/config.md.
    """
    conn = transaction.connection
    sender = transaction.sender
    return {
        "qpconn-sender": "" if sender is None or sender.is_null else sender.address,
        "qpconn-recipients": [rcpt.address for rcpt in transaction.recipients],
        "qpconn-queue-id": transaction.id,
        "qpconn-client-ip": conn.remote_ip or "",
        "qpconn-client-port": int(conn.remote_port or 0),
        "qpconn-client-host": conn.remote_host or "",
        "qpconn-helo": conn.hello_host or "",
        "qpconn-auth-user": conn.auth_user or "",
        "qpconn-host": me,
    }


class AMQP(Plugin):
    """Publish to RabbitMQ with publisher confirms; see the module docstring."""

    def register(self, *args: str) -> None:
        if pika is None:
            raise ValueError("needs pika, which is not installed: pip install 'qpconn[amqp]'")
        positional = [arg for arg in args if "=" not in arg]
        if len(positional) > 1:
            raise ValueError(f"takes one URL, then option=value ({', '.join(OPTIONS)})")
        settings: dict[str, str] = {}
        for arg in args:
            if "=" in arg:
                key, _, value = arg.partition("=")
                if key not in OPTIONS:
                    raise ValueError(f"unknown option {key!r} (known: {', '.join(OPTIONS)})")
                settings[key] = value
        self.url = positional[0] if positional else DEFAULT_URL
        if not self.url.startswith("amqp://"):
            raise ValueError(f"{self.url!r}: the URL must start with amqp:// (amqps: not yet)")
        try:
            pika.URLParameters(self.url)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bad AMQP URL {self.url!r}: {exc}") from None
        self.queue = settings.get("queue", "qpconn")
        self.queue_type = settings.get("queue_type", "classic")
        if self.queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type={self.queue_type!r}: use one of {', '.join(QUEUE_TYPES)}")
        self.exchange = settings.get("exchange", "")
        self.routing_key = settings.get("routing_key", self.queue)
        declare = settings.get("declare", "yes")
        if declare not in ("yes", "no"):
            raise ValueError(f"declare={declare!r}: use yes or no")
        self.declare = declare == "yes"
        try:
            self.publish_timeout = float(settings.get("timeout", "30"))
        except ValueError:
            raise ValueError(f"timeout={settings['timeout']!r} is not a number") from None
        if self.publish_timeout <= 0:
            raise ValueError("timeout must be positive")
        # The hook runner's own limit stays above ours, so the client gets our 451 text.
        self.timeout = self.publish_timeout + 5.0
        self._link: BrokerLink | None = None

    def _reactor(self) -> Any:
        if self.server is not None:
            return self.server.clock
        from twisted.internet import reactor

        return reactor

    @property
    def link(self) -> BrokerLink:
        """The broker connection, made on first use and kept up from then on."""
        if self._link is None or self._link.closed:
            self._link = BrokerLink(
                self.url, self._setup, self._reactor(), self.log,
                connect_timeout=self.publish_timeout,
                resolver=getattr(self.server, "hostname_resolver", None),
            )  # fmt: skip
        return self._link

    def detach(self) -> Any:
        """Close the broker connection and stop reconnecting (after a reload, at shutdown)."""
        link, self._link = self._link, None
        return link.close() if link is not None and not link.closed else None

    async def _setup(self, channel: Any) -> None:
        """Declare the durable queue (and its binding) on each new channel."""
        if not self.declare:
            return
        arguments = {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}
        await channel.queue_declare(self.queue, durable=True, arguments=arguments)
        if self.exchange:
            await channel.queue_bind(self.queue, self.exchange, routing_key=self.routing_key)

    def properties(self, transaction: Any) -> Any:
        """The message's AMQP properties: persistent, typed, with the envelope headers."""
        me = self.server.me if self.server is not None else self.config.me
        arrival = transaction.arrival_time
        return pika.BasicProperties(
            content_type="message/rfc822",
            delivery_mode=2,  # persistent: written to disk before the confirm
            message_id=transaction.id,
            timestamp=int(arrival) if arrival is not None else None,
            app_id="qpconn",
            headers=envelope_headers(transaction, me),
        )

    async def hook_queue(self, transaction: Any) -> Result | tuple[Result, str]:
        body = await self._message_text(transaction)
        label = self.link.label
        publish = defer.Deferred.fromCoroutine(
            self.link.publish(self.exchange, self.routing_key, body, self.properties(transaction))
        )
        publish.addTimeout(self.publish_timeout, self._reactor())
        try:
            await publish
        except (defer.TimeoutError, BrokerUnavailable, Refused, Unroutable,
                pika.exceptions.AMQPError) as exc:  # fmt: skip
            if isinstance(exc, defer.TimeoutError):
                reason = f"no confirm within {self.publish_timeout:g}s"
            else:
                reason = describe(exc)
            self.log.warn(
                "{queue_id} not queued to AMQP {broker}: {reason}",
                queue_id=transaction.id,
                broker=label,
                reason=reason,
            )
            status = "4.3.0" if isinstance(exc, Refused | Unroutable) else "4.4.1"
            text = f"Broker {label} did not take the message ({reason}); try again later"
            return DONE, f"451 {status} {text}"
        self.log.info(
            "{queue_id} queued to AMQP {broker} queue {queue}",
            queue_id=transaction.id,
            broker=label,
            queue=self.queue,
        )
        return OK, f"2.0.0 Queued as {transaction.id} (AMQP {label} confirmed)"

    async def _message_text(self, transaction: Any) -> bytes:
        """The whole message as bytes; a body spooled to disk is read in a worker thread."""
        if transaction.spool_path is None:
            return b"".join(transaction.message_chunks())
        worker_pool("amqp", 2)
        return await run_in_pool("amqp", lambda: b"".join(transaction.message_chunks()))
