"""queue/http URL secret_file=PATH [option=value ...]: POST each message to a web application.

For applications that receive mail (tickets, replies by mail, inbound parsing): the web
app gets one HTTP request per message, and its answer is what the SMTP client is told, so
a message is acknowledged only once the application has it.

The request (docs/config.md has the consumer's side, with an example):

* ``POST URL`` with the message as the body, exactly as stored (our ``Received`` field on
  top, CRLF line endings), ``Content-Type: message/rfc822`` and its ``Content-Length``;
* the envelope in header fields: ``X-Envelope-From`` (empty for ``<>``), one
  ``X-Envelope-To`` per recipient in order, ``X-Client-IP``, ``X-Helo``, ``X-Queue-Id``,
  ``X-Auth-User`` (each always present, empty when unknown);
* ``X-Timestamp`` (Unix seconds) and ``X-Signature: sha256=<hex>``, HMAC-SHA256 with the
  shared secret over the :func:`signed_text`: those values, one per line, then the body.
  Signing the envelope too means nobody can replay a body to other recipients; the
  timestamp bounds replays in time, and ``X-Queue-Id`` (unique per message) lets the
  application drop the duplicate of a retried delivery.

Why header fields and a raw body rather than a multipart form: the body is the message
and nothing else, a framework hands it over unparsed, and the signature covers octets
the application already has, with no form encoding in between.

The answer: 2xx gives ``250``; 4xx (except 408 and 429, which HTTP itself calls
temporary) gives ``550`` with the first line of the answer's body as the reason
(sanitised; an enhanced status code at its start is kept); 5xx, any other status, no
answer within ``timeout`` seconds, or no connection give ``451``, so the sender retries.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, error
from twisted.logger import LogLevel

import qpconn
from qpconn.client.httppost import HTTPAnswer, MessageProducer, post
from qpconn.hooks.results import DONE, OK, Result
from qpconn.hooks.verdicts import with_class
from qpconn.kit.threads import run_in_pool
from qpconn.plugins import Plugin

__all__ = ["HTTPQueue", "signed_text", "first_line"]

OPTIONS = ("secret", "secret_file", "timeout")
#: statuses of the 4xx class that mean "try again later" (RFC 9110 §15.5.9, RFC 6585 §4)
TEMPORARY_4XX = frozenset({408, 429})
#: the characters kept in a reason given to the SMTP client: printable ASCII
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
#: the envelope fields, in the order the signature takes them
FIELDS = ("X-Queue-Id", "X-Envelope-From", "X-Envelope-To", "X-Client-IP", "X-Helo",
          "X-Auth-User")  # fmt: skip


def _value(text: str | None) -> bytes:
    """A header field value: UTF-8, with control characters (CR, LF) as ``?``."""
    return _HEADER_UNSAFE.sub("?", text or "").encode("utf-8")


def signed_text(timestamp: bytes, envelope: dict[str, list[bytes]]) -> bytes:
    """What the signature covers, before the body: ``X-Timestamp``, then each field of
    :data:`FIELDS` (its values joined with ``", "``, as frameworks join repeated
    fields), each followed by ``\\n``."""
    lines = [timestamp] + [b", ".join(envelope[name]) for name in FIELDS]
    return b"\n".join(lines) + b"\n"


def first_line(body: bytes, limit: int = 200) -> str:
    """The first non-blank line of an answer, as printable ASCII, at most ``limit`` long."""
    for line in body.splitlines():
        text = _UNPRINTABLE.sub("?", line.decode("utf-8", "replace")).strip()
        if text:
            return text[:limit]
    return ""


class HTTPQueue(Plugin):
    """Queue plugin posting each message to a URL; see the module docstring."""

    def register(self, *args: str) -> None:
        words = list(args)
        if not words or "=" in words[0]:
            raise ValueError("expects a URL first: queue/http http://127.0.0.1:8000/mail ...")
        self.url = words.pop(0)
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"URL must be http:// or https:// with a host, not {self.url!r}")
        self.where = parts.netloc.rpartition("@")[2]  # no user:password in the logs
        settings: dict[str, str] = {}
        for word in words:
            key, sep, value = word.partition("=")
            if not sep or key not in OPTIONS:
                raise ValueError(f"unknown option {word!r} (known: {', '.join(OPTIONS)})")
            settings[key] = value
        self.secret = self._secret(settings)
        try:
            self.post_timeout = float(settings.get("timeout", "30"))
        except ValueError:
            raise ValueError(f"timeout must be a number, not {settings['timeout']!r}") from None
        if self.post_timeout <= 0:
            raise ValueError("timeout must be positive")
        # The hook runner's limit stays above ours, so the client gets our own 451.
        self.timeout = self.post_timeout + 5.0

    def _secret(self, settings: dict[str, str]) -> bytes:
        if "secret_file" in settings and "secret" in settings:
            raise ValueError("give secret_file=PATH or secret=TEXT, not both")
        if "secret_file" in settings:
            path = self.config.path(settings["secret_file"])
            with open(path, encoding="utf-8") as handle:
                lines = [line.strip() for line in handle if line.strip()]
            secret = lines[0] if lines else ""
        else:
            secret = settings.get("secret", "")
        if len(secret) < 16:
            raise ValueError("needs secret_file=PATH (or secret=TEXT) of 16 characters or more")
        return secret.encode("utf-8")

    def envelope(self, transaction: Any) -> dict[str, list[bytes]]:
        """The envelope's header fields (name -> values) of one message."""
        connection, sender = transaction.connection, transaction.sender
        return {
            "X-Queue-Id": [_value(transaction.id)],
            "X-Envelope-From": [_value("" if sender is None else sender.address)],
            "X-Envelope-To": [_value(rcpt.address) for rcpt in transaction.recipients],
            "X-Client-IP": [_value(connection.remote_ip)],
            "X-Helo": [_value(connection.hello_host)],
            "X-Auth-User": [_value(connection.auth_user)],
        }

    def _digest(self, start: bytes, chunks: Iterable[bytes]) -> tuple[str, int]:
        """The signature's hex digest and the body's length (reads the whole message)."""
        mac = hmac.new(self.secret, start, hashlib.sha256)
        length = 0
        for chunk in chunks:
            mac.update(chunk)
            length += len(chunk)
        return mac.hexdigest(), length

    async def hook_queue(self, transaction: Any) -> tuple[Result, str]:
        from twisted.internet import reactor

        envelope = self.envelope(transaction)
        # wall-clock time, whatever clock the server runs on: the application compares it
        # with its own to refuse replays
        timestamp = str(int(time.time()))
        start = signed_text(timestamp.encode("ascii"), envelope)
        chunks = transaction.message_chunks
        if transaction.spool_path is None:  # in memory: hashing it costs less than a thread
            digest, length = self._digest(start, chunks())
        else:
            digest, length = await run_in_pool("http", self._digest, start, chunks())
        headers = {name.encode("ascii"): values for name, values in envelope.items()}
        headers.update({
            b"Content-Type": [b"message/rfc822"],
            b"User-Agent": [f"qpconn/{qpconn.__version__}".encode("ascii")],
            b"X-Timestamp": [timestamp.encode("ascii")],
            b"X-Signature": [b"sha256=" + digest.encode("ascii")],
        })  # fmt: skip
        body = MessageProducer(chunks, length)
        try:
            answer = await post(reactor, self.url.encode("ascii"), headers, body,
                                self.post_timeout,
                                getattr(self.server, "hostname_resolver", None))  # fmt: skip
        except defer.TimeoutError:
            return self._unavailable(transaction, "timeout",
                                     f"no answer within {self.post_timeout:g}s")  # fmt: skip
        except error.ConnectionRefusedError:
            return self._unavailable(transaction, "refused", "connection refused")
        except Exception as exc:  # DNS, TLS, a connection closed before the answer
            return self._unavailable(transaction, "error", _describe(exc))
        return self._answered(transaction, answer)

    def _answered(self, transaction: Any, answer: HTTPAnswer) -> tuple[Result, str]:
        code, reason = answer.code, first_line(answer.body)
        status = f"HTTP {code} {answer.phrase}".strip()
        outcome = f"{code // 100}xx" if 200 <= code < 600 else "other"
        self.log.emit_fields(
            LogLevel.info if 200 <= code < 300 else LogLevel.warn,
            "{queue_id} {url}: {status} {reason}",
            {"queue_id": transaction.id, "url": self.where, "status": status,
             "reason": reason, "event": "http_queue", "outcome": outcome, "plugin": self.name},
        )  # fmt: skip
        if 200 <= code < 300:
            return OK, f"2.0.0 Queued as {transaction.id} ({status})"
        if 400 <= code < 500 and code not in TEMPORARY_4XX:
            text = with_class(reason, "5") if reason else f"5.7.1 Refused ({status})"
            return DONE, f"550 {text}"
        return DONE, f"451 4.3.0 The application answered {status}; try again later"

    def _unavailable(self, transaction: Any, outcome: str, reason: str) -> tuple[Result, str]:
        self.log.warn(
            "{queue_id} {url} unavailable: {reason}",
            queue_id=transaction.id,
            url=self.where,
            reason=reason,
            event="http_queue",
            outcome=outcome,
            plugin=self.name,
        )
        text = _UNPRINTABLE.sub("?", reason)
        return DONE, f"451 4.4.1 {self.where} unavailable ({text}); try again later"


def _describe(exc: Exception) -> str:
    """A short reason for the log and the reply, from Twisted's nested failures."""
    reasons = getattr(exc, "reasons", None)
    if reasons:
        inner = reasons[0].value
        return f"{type(inner).__name__}: {inner}"[:200]
    return f"{type(exc).__name__}: {exc}"[:200]
