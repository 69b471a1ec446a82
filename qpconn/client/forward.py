"""What ``queue/smtp-forward`` and ``queue/lmtp`` share: options, the pool, and the rules
that turn a next hop's replies into the one reply our client gets after DATA.

The promise kept: our client hears 250 only after the next hop said 250 (to the end of
DATA, or for LMTP for every recipient), and a failure is never swallowed. The rules, in
the order they apply (each is repeated in docs/config.md):

1. The next hop is down, slow (past ``timeout``), closes mid-way or talks nonsense:
   ``451 4.4.1``. Nothing may have been delivered, so the client retries.
2. MAIL refused: its reply is ours (4xx stays 4xx, 5xx stays 5xx).
3. No recipient accepted: the first temporary refusal if there is one (a retry may
   succeed), else the first permanent one.
4. Some recipient refused temporarily (others accepted): nothing is sent, the client gets
   that 4xx and retries the whole message later. Since nothing was delivered, the retry
   makes no duplicate; the accepted recipients wait, which is the price of losing nothing.
5. Some recipients refused permanently, the others accepted: the message goes to the
   accepted ones only. ``queue/smtp-forward`` then reports the refused ones to the sender
   with a bounce through the same next hop (:mod:`qpconn.client.dsn`) before answering
   250. ``queue/lmtp`` (a mailbox store, which cannot carry a bounce) sends nothing and
   answers the first permanent refusal: the client bounces the message with that reason
   and nobody gets a duplicate.
6. The reply to the end of DATA is ours. For LMTP, one per recipient: all accepted is
   250; a temporary failure for any recipient is 451 (the client retries; recipients
   already delivered get a duplicate, logged as such); otherwise (permanent failures,
   none temporary) the first permanent reply, saying how many recipients did get it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from qpconn.client.extensions import (
    binary_refusal,
    envelope_lines,
    extension_mail_params,
    send_bdat,
    smtputf8_refusal,
    use_bdat,
)
from qpconn.client.pool import STARTTLS_MODES, ConnectionPool, Destination
from qpconn.client.smtp import ClientReply, NextHopError, NextHopTLSError, SMTPClient
from qpconn.hooks.plugin import Plugin
from qpconn.hooks.results import DONE, OK, Result
from qpconn.mail.outcomes import set_recipient_reply

__all__ = ["ForwardingQueue"]

Verdict = tuple[Result, str]


def _reply_line(reply: ClientReply) -> str:
    """``CODE text`` for DONE: the next hop's code and words become ours verbatim."""
    return f"{reply.code} {reply.text}".rstrip()


class ForwardingQueue(Plugin):
    """Base of the forwarding queue plugins; subclasses set ``lmtp`` and ``default_port``."""

    lmtp = False
    default_port = 25
    options = ("starttls", "timeout", "pool", "idle", "tls_ca")

    def register(self, *args: str) -> None:
        positional = [arg for arg in args if "=" not in arg]
        settings: dict[str, str] = {}
        for arg in args:
            if "=" in arg:
                key, _, value = arg.partition("=")
                if key not in self.options:
                    raise ValueError(f"unknown option {key!r} (known: {', '.join(self.options)})")
                settings[key] = value
        starttls = settings.get("starttls", "no")
        if starttls not in STARTTLS_MODES:
            raise ValueError(f"starttls={starttls!r}: use one of {', '.join(STARTTLS_MODES)}")
        self.destination = self._destination(positional, starttls, settings.get("tls_ca"))
        #: seconds for one whole delivery (connect, dialogue, message): past it, 451
        self.delivery_timeout = _number(settings, "timeout", 60.0)
        pool_size = int(_number(settings, "pool", 2))
        idle = _number(settings, "idle", 30.0)
        # The hook runner's own limit stays above ours, so the client gets our 451 text.
        self.timeout = self.delivery_timeout + 5.0
        self._pool_settings = (pool_size, idle)
        self._pool: ConnectionPool | None = None
        if starttls != "no":
            try:
                import OpenSSL  # noqa: F401
            except ImportError:
                raise ValueError("starttls needs pyOpenSSL: pip install 'twisted[tls]'") from None

    def _destination(self, words: list[str], starttls: str, tls_ca: str | None) -> Destination:
        usage = f"expects HOST [PORT] or unix:/path, then options ({', '.join(self.options)})"
        if not words or len(words) > 2:
            raise ValueError(usage)
        if words[0].startswith("unix:"):
            if len(words) > 1:
                raise ValueError(usage)
            return Destination(path=words[0][5:], lmtp=self.lmtp, starttls=starttls, tls_ca=tls_ca)
        host = words[0].strip("[]")
        port = self.default_port
        if len(words) == 2:
            if not words[1].isdigit() or not 0 < int(words[1]) < 65536:
                raise ValueError(f"port {words[1]!r} is not a port number")
            port = int(words[1])
        return Destination(host, port, lmtp=self.lmtp, starttls=starttls, tls_ca=tls_ca)

    # -- the connection pool ----------------------------------------------------------
    def _reactor(self) -> Any:
        if self.server is not None:
            return self.server.clock
        from twisted.internet import reactor

        return reactor

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None or self._pool.closed:
            size, idle = self._pool_settings
            me = self.server.me if self.server is not None else self.config.me
            self._pool = ConnectionPool(
                self.destination,
                helo=me,
                reactor=self._reactor(),
                size=size,
                idle_timeout=idle,
                connect_timeout=self.delivery_timeout,
                resolver=getattr(self.server, "hostname_resolver", None),
            )
        return self._pool

    def detach(self) -> Any:
        """QUIT the pooled connections to the next hop (after a reload, at shutdown)."""
        pool, self._pool = self._pool, None
        return pool.close() if pool is not None and not pool.closed else None

    # -- the queue hook ---------------------------------------------------------------
    async def hook_queue(self, transaction: Any) -> Verdict:
        label = self.destination.label
        delivery = defer.Deferred.fromCoroutine(self._deliver(transaction))
        delivery.addTimeout(self.delivery_timeout, self._reactor())
        try:
            verdict = await delivery
        except (NextHopError, defer.TimeoutError, defer.CancelledError, OSError) as exc:
            reason = "timed out" if isinstance(exc, defer.TimeoutError) else str(exc)
            self.log.warn(
                "{queue_id} not delivered to {dest}: {reason}",
                queue_id=transaction.id,
                dest=label,
                reason=reason,
            )
            # 4.7.5 (RFC 3463: cryptographic failure) for TLS, as Postfix says it
            status = "4.7.5" if isinstance(exc, NextHopTLSError) else "4.4.1"
            return DONE, f"451 {status} Next hop {label} unavailable ({reason}); try again later"
        self.log.info(
            "{queue_id} {dest}: {verdict}",
            queue_id=transaction.id,
            dest=label,
            verdict=verdict[1],
        )
        return verdict

    async def _deliver(self, transaction: Any) -> Verdict:
        client = await self.pool.acquire()
        reuse = False
        try:
            verdict = await self.transfer(client, transaction)
            reuse = True
            return verdict
        finally:
            self.pool.release(client, reuse)

    async def transfer(self, client: SMTPClient, txn: Any) -> Verdict:
        """Rules 2-6 of the module docstring for one message on one connection."""
        label = self.destination.label
        refusal = smtputf8_refusal(client, txn, label) or binary_refusal(client, txn, label)
        if refusal is not None:  # the next hop lacks SMTPUTF8/BINARYMIME: permanent
            return DONE, refusal
        rcpts = [rcpt.format() for rcpt in txn.recipients]
        sender, wire = envelope_lines(client, txn)  # A-labels, NOTIFY/ORCPT: extensions.py
        mail, replies = await client.envelope(sender, wire, self._mail_params(client, txn))
        _check(mail, *replies)
        notes: dict[str, Any] = {"destination": self.destination.label, "mail": str(mail)}
        notes["rcpts"] = {rcpt: str(reply) for rcpt, reply in zip(rcpts, replies, strict=False)}
        txn.notes["forward"] = notes
        if not mail.positive:
            return DONE, _reply_line(mail)
        accepted = [rcpt for rcpt, reply in zip(rcpts, replies, strict=True) if reply.positive]
        temporary = [(r, rep) for r, rep in zip(rcpts, replies, strict=True) if rep.temporary]
        permanent = [(r, rep) for r, rep in zip(rcpts, replies, strict=True) if rep.permanent]
        if not accepted:
            return DONE, _reply_line((temporary or permanent)[0][1])
        if temporary:
            return DONE, f"{_reply_line(temporary[0][1])} (not delivered to any recipient)"
        if permanent and self.lmtp:
            return DONE, f"{_reply_line(permanent[0][1])} (not delivered to any recipient)"
        expected = len(accepted) if self.lmtp else 1
        if use_bdat(client, txn):
            go_ahead, finals = await send_bdat(client, txn.message_chunks(), expected)
        else:
            go_ahead, finals = await client.data(txn.message_chunks(), expected)
        notes["data"] = [str(reply) for reply in finals] or [str(go_ahead)]
        if not finals:
            _check(go_ahead)
            return DONE, _reply_line(go_ahead)
        _check(*finals)
        if self.lmtp:
            return self.lmtp_verdict(txn, list(zip(accepted, finals, strict=True)))
        final = finals[0]
        if not final.positive:
            return DONE, _reply_line(final)
        if permanent:
            failed = await self.report_refused(client, txn, permanent)
            if failed is not None:
                return failed
        return OK, f"2.0.0 Queued as {txn.id} ({self.destination.label} said: {final.text})"

    def _mail_params(self, client: SMTPClient, txn: Any) -> str:
        params = []
        if "SIZE" in client.extensions and txn.data_size:
            params.append(f"SIZE={txn.data_size}")
        body = (txn.mail_params.get("BODY") or "").upper()
        if body in ("8BITMIME", "BINARYMIME") and body in client.extensions:
            params.append(f"BODY={body}")
        params += extension_mail_params(client, txn)  # SMTPUTF8, RET, ENVID
        return " ".join(params)

    def lmtp_verdict(self, txn: Any, results: list[tuple[str, ClientReply]]) -> Verdict:
        """Rule 6 for LMTP's one reply per recipient.

        Each recipient's own reply is also kept (qpconn.mail.outcomes), so when our client speaks
        LMTP to us it learns exactly who got the message: no duplicate on its retry.
        """
        for rcpt, reply in results:
            set_recipient_reply(txn, rcpt.strip("<>"), _reply_line(reply))
        delivered = [rcpt for rcpt, reply in results if reply.positive]
        temporary = [(rcpt, reply) for rcpt, reply in results if reply.temporary]
        permanent = [(rcpt, reply) for rcpt, reply in results if reply.permanent]
        count = f"delivered to {len(delivered)} of {len(results)} recipients"
        if not temporary and not permanent:
            texts = "; ".join(sorted({reply.text for _, reply in results}))
            return OK, f"2.0.0 Queued as {txn.id} ({self.destination.label} said: {texts})"
        if temporary:
            lmtp_client = txn.connection is not None and txn.connection.notes.get("lmtp")
            if delivered and not lmtp_client:  # over LMTP each recipient hears its own
                self.log.error(
                    "{queue_id} LMTP {count}; the client is told to retry, so {rcpts} "
                    "will receive a duplicate",
                    queue_id=txn.id,
                    count=count,
                    rcpts=", ".join(delivered),
                )
                rcpt, reply = temporary[0]
                return DONE, f"451 4.3.0 {rcpt}: {reply} ({count}); try again later"
            return DONE, _reply_line(temporary[0][1])
        rcpt, reply = permanent[0]
        suffix = f" ({count})" if delivered else ""
        return DONE, f"{_reply_line(reply)}{suffix}"

    async def report_refused(
        self, client: SMTPClient, txn: Any, refused: list[tuple[str, ClientReply]]
    ) -> Verdict | None:
        """Rule 5 for smtp-forward: bounce the refused recipients; None when that is done
        (or cannot be, for good reason), else the temporary failure our client gets."""
        return None


def _check(*replies: ClientReply) -> None:
    """A reply that is no answer (1xx, 3xx where none belongs) means we are out of step."""
    for reply in replies:
        if not 200 <= reply.code < 600 or 300 <= reply.code < 400:
            raise NextHopError(f"unexpected reply {reply}")


def _number(settings: dict[str, str], key: str, default: float) -> float:
    value = settings.get(key)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not a number") from None
    if number <= 0:
        raise ValueError(f"{key}={value!r} must be positive")
    return number
