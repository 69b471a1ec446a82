"""rspamd: have each message judged by rspamd at ``data_post`` and do what it says.

The message (with our ``Received`` on top) goes to rspamd's normal worker over its own
HTTP protocol (``POST /checkv2``, :mod:`qpconn.kit.rspamd`), with the envelope in request
headers. rspamd's answer decides:

* ``reject`` (and ``discard``, which we will not do silently): ``550 5.7.1`` and rspamd's
  ``smtp_message`` (default ``Spam message rejected``);
* ``soft reject``, ``greylist``: ``451 4.7.1`` and its message (default ``Try again
  later``), so the sender retries;
* ``rewrite subject``: the Subject becomes rspamd's (``*** SPAM *** <subject>`` unless
  configured otherwise there), and the spam header is added;
* ``add header`` (and ``quarantine``: there is no quarantine here): ``X-Spam: Yes``;
* ``no action``: the message goes on unmarked.

Whatever the action, the header fields rspamd asks for (``milter.remove_headers``, then
``milter.add_headers``, which its ``milter_headers`` module fills) are removed and added,
a ``DKIM-Signature`` it made is put on top, and the verdict lands in
``transaction.notes["rspamd"]`` (action, score, required score, every symbol with its
score), a verdict note and one log line (``event="plugin_outcome"``, which the metrics
count). ``X-Spam`` fields the message came with are removed first, scanned or not: a
sender must not pass its own verdict along.

``reject 0`` only marks: a ``reject`` becomes ``add header``, a soft reject or greylist
lets the message through unmarked.

When rspamd cannot be reached, answers with an error or nonsense, or takes longer than
``timeout`` seconds (default 15), ``on_error accept`` (the default) accepts the message
unscanned with a warning in the log, and ``on_error tempfail`` answers ``451 4.7.1``. The
default is Haraka's (its rspamd plugin defers on neither errors nor timeouts) and the
one rspamd's own documentation asks of Postfix (``milter_default_action = accept``): a
scanner that is down must not stop the mail. Messages over ``max_size`` octets (default
50 MiB, rspamd's own ``max_message``) are not sent.

Arguments (``name value`` or ``name=value``): ``host`` (default 127.0.0.1), ``port``
(11333), ``socket /path`` (a unix socket instead), ``timeout``, ``on_error
accept|tempfail``, ``settings_id NAME`` (rspamd's ``Settings-ID``), ``reject 1|0``,
``max_size``.
"""

from __future__ import annotations

import itertools
import re
from email.header import Header as EncodedHeader
from typing import Any

from qpconn.hooks.results import DECLINED, DONE
from qpconn.hooks.verdicts import record, with_class
from qpconn.kit.policy import parse_options
from qpconn.kit.rspamd import RspamdAnswer, RspamdClient, request_headers
from qpconn.kit.scanclient import ScanError, endpoint
from qpconn.kit.threads import run_in_pool
from qpconn.plugins import Plugin
from qpconn.plugins.dkim import message_bytes

__all__ = ["Rspamd", "NOTE", "SPAM_HEADER"]

NOTE = "rspamd"
#: the field that marks spam, rspamd's own name for it (its proxy and milter add it)
SPAM_HEADER = "X-Spam"
#: actions that mean spam, delivered marked
_MARKED = ("add header", "rewrite subject", "quarantine")
_FIELD_NAME = re.compile(r"[!-9;-~]+\Z")  # RFC 5322 §3.6.8: printable ASCII but ':'


def _field_value(value: str) -> str:
    """rspamd's folded value (CRLF + tab) in the form Header.add takes; other breaks go."""
    value = value.replace("\r\n", "\n").replace("\r", " ").replace("\0", "")
    return re.sub(r"\n(?![ \t])", " ", value).strip("\n")


def _nth(target: int) -> Any:
    """A delete_if predicate true for the ``target``-th field (from 0) it is asked about:
    delete_if asks about the fields of one name in message order."""
    seen = itertools.count()
    return lambda _value: next(seen) == target


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Rspamd(Plugin):
    """Asks rspamd about each message at ``data_post``; see the module docstring."""

    def register(self, *args: str) -> None:
        options = parse_options(
            self.name,
            args,
            {"host": "127.0.0.1", "port": "11333", "socket": "", "timeout": "15",
             "on_error": "accept", "settings_id": "", "reject": "1", "max_size": "52428800"},
            {"on_error": ("accept", "tempfail"), "reject": ("1", "0")},
            numbers=["port", "timeout", "max_size"],
        )  # fmt: skip
        if options["socket"]:
            self.address = options["socket"]
        else:
            host, port = options["host"].strip("[]"), options["port"]
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        endpoint(None, self.address, 1.0)  # a bad address stops the start
        self.scan_timeout = float(options["timeout"])
        if self.scan_timeout <= 0:
            raise ValueError(f"{self.name}: timeout must be positive")
        self.on_error = options["on_error"]
        self.settings_id = options["settings_id"] or None
        if self.settings_id is not None and not re.fullmatch(r"[\w.-]+", self.settings_id):
            raise ValueError(f"{self.name}: settings_id {self.settings_id!r} is not a plain name")
        self.reject = options["reject"] == "1"
        self.max_size = int(float(options["max_size"]))
        # the hook may take the scan plus reading a spooled message
        self.timeout = self.scan_timeout + 10
        self._client: RspamdClient | None = None

    @property
    def client(self) -> RspamdClient:
        if self._client is None:
            if self.server is not None:
                reactor = self.server.clock
            else:
                from twisted.internet import reactor
            self._client = RspamdClient(reactor, self.address, self.scan_timeout)
        return self._client

    async def hook_data_post(self, transaction: Any) -> Any:
        transaction.header.delete(SPAM_HEADER)
        message = await run_in_pool("scan", message_bytes, transaction)
        if len(message) > self.max_size:
            reason = f"{len(message)} octets > max_size"
            record(transaction, self.name, "skip", reason)
            self._outcome(transaction, "skipped", reason)
            return DECLINED
        me = self.server.me if self.server is not None else self.config.me
        try:
            answer = await self.client.check(
                message, request_headers(transaction, me, self.settings_id)
            )
        except ScanError as exc:
            return self._failed(transaction, str(exc))
        transaction.notes[NOTE] = {
            "action": answer.action,
            "score": answer.score,
            "required": answer.required,
            "symbols": dict(answer.symbols),
            "message": answer.smtp_message,
            "skipped": answer.skipped,
        }
        self._apply_headers(transaction, answer)
        return self._decide(transaction, answer)

    # -- the verdict ------------------------------------------------------------------
    def _decide(self, transaction: Any, answer: RspamdAnswer) -> Any:
        action = answer.action
        reason = f"{action}, score {answer.score:g} required {answer.required:g}"
        symbols = ", ".join(f"{name}({score:g})" for name, score in answer.symbols.items())
        self._outcome(transaction, action, f"{reason} [{symbols}]")
        if action in ("reject", "discard") and self.reject:
            record(transaction, self.name, "spam", reason, action="reject")
            text = _one_line(answer.smtp_message or "Spam message rejected")
            return DONE, "550 " + with_class(text, "5")
        if action in ("soft reject", "greylist") and self.reject:
            record(transaction, self.name, "defer", reason, action="tempfail")
            text = _one_line(answer.smtp_message or "Try again later")
            return DONE, "451 " + with_class(text, "4")
        spam = action in _MARKED or action in ("reject", "discard")
        if action == "rewrite subject":
            self._rewrite_subject(transaction, answer.subject)
        if spam:
            transaction.header.add(SPAM_HEADER, "Yes")
        record(transaction, self.name, "spam" if spam else "ham", reason, action="accept")
        return DECLINED

    def _failed(self, transaction: Any, why: str) -> Any:
        action = "tempfail" if self.on_error == "tempfail" else "accept"
        self.log.warn(
            "{queue_id} rspamd at {address} failed ({error}); on_error {action}",
            queue_id=transaction.id,
            address=self.address,
            error=why,
            action=action,
            event="plugin_outcome",
            plugin=self.name,
            outcome="error",
        )
        record(transaction, self.name, "temperror", why, action=action)
        if action == "tempfail":
            return DONE, "451 4.7.1 Spam scanner unavailable; try again later"
        return DECLINED

    def _outcome(self, transaction: Any, outcome: str, detail: str) -> None:
        """The one log line per message, which the metrics count by ``outcome``."""
        self.log.info(
            "{queue_id} rspamd: {detail}",
            queue_id=transaction.id,
            detail=detail,
            event="plugin_outcome",
            plugin=self.name,
            outcome=outcome.replace(" ", "_"),
        )

    # -- the header -------------------------------------------------------------------
    def _apply_headers(self, transaction: Any, answer: RspamdAnswer) -> None:
        """rspamd's milter header changes, removals first (as its milter proxy does)."""
        header = transaction.header
        for name, which in answer.remove_headers.items():
            if not _FIELD_NAME.match(name):
                continue
            if which == 0:
                header.delete(name)
                continue
            target = which - 1 if which > 0 else header.count(name) + which
            header.delete_if(name, _nth(target))
        for name, values in answer.add_headers.items():
            if not _FIELD_NAME.match(name):
                continue
            for value, order in values:
                index = order if order is not None and order >= 0 else None
                header.add(name, self._encoded(transaction, _field_value(value)), index=index)
        for signature in answer.dkim_signatures:
            head, _, value = signature.partition(":")
            if head.strip().lower() == "dkim-signature":  # some versions send the whole field
                signature = value
            header.add("DKIM-Signature", _field_value(signature.strip()), index=0)

    def _rewrite_subject(self, transaction: Any, subject: str | None) -> None:
        header = transaction.header
        if subject is None:  # rspamd's own default, in case an old one sends none
            subject = f"*** SPAM *** {header.get('Subject') or ''}".rstrip()
        names = [name.lower() for name in header.names()]
        index = names.index("subject") if "subject" in names else None
        header.delete("Subject")
        header.add("Subject", self._encoded(transaction, _field_value(subject)), index=index)

    @staticmethod
    def _encoded(transaction: Any, value: str) -> str:
        """UTF-8 in a field only for an SMTPUTF8 message; else RFC 2047 encoded words."""
        if value.isascii() or transaction.smtputf8:
            return value
        return EncodedHeader(value, "utf-8").encode(linesep="\n")
