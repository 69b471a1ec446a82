"""milter: run each session past Sendmail/Postfix milters, with their verdicts and changes.

The milters are the filters Postfix and Sendmail talk to (rspamd, OpenDKIM, OpenDMARC,
clamav-milter ...); their verdicts become hook results, their changes are applied to the
message before it is queued.

``milter ADDRESS [ADDRESS ...] [option value ...]``: each ``ADDRESS`` is Postfix's
``inet:HOST:PORT``, ``inet:[IPv6]:PORT`` or ``unix:/path`` (Sendmail's ``inet:PORT@HOST``
and ``local:/path`` work too). The milters of one line are asked in the order written,
each step going to the first, then the next, until one refuses, as Postfix does with
``smtpd_milters``; several ``milter`` lines work too, each with its own options, in the
order of the ``plugins`` file. Options: ``default_action tempfail|accept``,
``connect_timeout N``, ``command_timeout N``, ``content_timeout N`` (seconds); without
them the settings ``milter_default_action``, ``milter_connect_timeout``,
``milter_command_timeout`` and ``milter_content_timeout`` apply (Postfix's names and
defaults: tempfail, 30, 30, 300).

Each SMTP session opens its own connection to each milter (at ``connect``) and closes it
at ``disconnect``. The steps: ``connect`` (SMFIC_CONNECT), ``helo``/``ehlo``, ``mail``,
``rcpt``, ``data`` (SMFIC_DATA), then at ``data_post`` the header fields (with our
``Received`` on top), the end of header, the body in chunks of at most 65535 octets and
the end of message; ``reset_transaction`` sends SMFIC_ABORT, ``disconnect`` SMFIC_QUIT.

What the milters' answers become is in :mod:`qpconn.milter.link`: ``reject`` is
``DENY`` (with the milter's reply text when it sent one), ``tempfail`` ``DENYSOFT``,
``accept`` stops asking that milter about this message (at connect or HELO: this
session), ``discard`` accepts the message and drops it: ``transaction.notes["milter"]``
gets ``"discard"`` and this plugin's own ``queue`` hook answers ``OK`` for it, so the
queue plugins, listed after it, never store it. ``quarantine`` adds
``X-Milter-Quarantine: <reason> (<milter>)`` on top and a note; the message is delivered.
The changes (header, body, recipients, sender) are applied before the next milter
sees the message, and before the queue.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from twisted.internet import defer

from qpconn.hooks.results import DECLINED, OK
from qpconn.hooks.verdicts import record
from qpconn.kit.policy import parse_options
from qpconn.kit.threads import run_in_pool
from qpconn.log.level import LevelLogger
from qpconn.milter import codec
from qpconn.milter.client import Timeouts, parse_address
from qpconn.milter.codec import MAX_BODY_CHUNK
from qpconn.milter.link import MilterLink, Verdict
from qpconn.milter.macros import (
    connect_macros,
    helo_macros,
    mail_macros,
    message_macros,
    rcpt_macros,
)
from qpconn.plugins import Plugin

__all__ = ["Milter", "NOTE", "QUARANTINE_FIELD"]

#: transaction.notes key: {"discard": address or None, "quarantine": [...], "verdicts": [...]}
NOTE = "milter"
QUARANTINE_FIELD = "X-Milter-Quarantine"
_LINKS = "milter_links"  # connection.notes: this session's MilterLinks, per plugin line
_SETTINGS = ("milter_default_action", "milter_connect_timeout", "milter_command_timeout",
             "milter_content_timeout")  # fmt: skip


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class Milter(Plugin):
    """Asks milters about every step of each session; see the module docstring."""

    config_files = _SETTINGS

    def register(self, *args: str) -> None:
        words = list(args)
        self.addresses: list[str] = []
        while words and words[0].split(":", 1)[0] in ("inet", "inet6", "unix", "local"):
            address = words.pop(0)
            parse_address(address)  # a bad address stops the start
            self.addresses.append(address)
        if not self.addresses:
            raise ValueError(f"{self.name}: give at least one inet:HOST:PORT or unix:/path")
        config = self.config
        defaults = {  # the settings; this line's options win
            "default_action": (config.get("milter_default_action") or "tempfail").lower(),
            "connect_timeout": config.get("milter_connect_timeout") or "30",
            "command_timeout": config.get("milter_command_timeout") or "30",
            "content_timeout": config.get("milter_content_timeout") or "300",
        }
        options = parse_options(
            self.name, words, defaults, {"default_action": ("tempfail", "accept")},
            numbers=["connect_timeout", "command_timeout", "content_timeout"],
        )  # fmt: skip
        if options["default_action"] not in ("tempfail", "accept"):
            raise ValueError(f"{self.name}: default_action must be tempfail or accept")
        self.default_action = options["default_action"]
        self.timeouts = Timeouts(
            *(
                float(options[key])
                for key in ("connect_timeout", "command_timeout", "content_timeout")
            )
        )
        if min(self.timeouts.connect, self.timeouts.command, self.timeouts.content) <= 0:
            raise ValueError(f"{self.name}: timeouts must be above 0")
        # Each wait is bounded by the timeouts; this is only the hook runner's backstop.
        per_milter = self.timeouts.connect + 2 * self.timeouts.command + 4 * self.timeouts.content
        self.timeout = len(self.addresses) * per_milter + 10
        self._key = " ".join(args)
        local = self.config.lines("rcpthosts") + self.config.lines("morercpthosts")
        self.local_domains = {domain.lower() for domain in local} | {self.config.me.lower()}
        self.events = LevelLogger(namespace=f"qpconn.plugin.{self.name}", source=self)
        self.factory: Any = None

    def attach(self, server: Any) -> None:
        super().attach(server)
        self.factory = server  # the metrics count this plugin's verdict events by factory

    # -- the session's links --------------------------------------------------------------
    def _links(self, transaction: Any) -> list[MilterLink]:
        return transaction.connection.notes.get(_LINKS, {}).get(self._key, [])

    def _note(self, transaction: Any) -> dict[str, Any]:
        return transaction.notes.setdefault(NOTE, {"discard": None, "quarantine": [],
                                                   "verdicts": []})  # fmt: skip

    def _macros(
        self, transaction: Any, stage: dict[str, str | None] | None = None
    ) -> dict[str, str | None]:
        connection = transaction.connection
        values = connect_macros(connection, self.config.me)
        values.update(helo_macros(connection))
        if transaction.sender is not None:
            values.update(mail_macros(transaction, transaction.sender))
        values.update(message_macros(transaction))
        values.update(stage or {})
        return values

    async def _each(
        self, transaction: Any, stage: str, ask: Callable[[MilterLink], Awaitable[Any]]
    ) -> Any:
        """Ask each milter of the line in turn; the first refusal (or a discard) decides."""
        for link in self._links(transaction):
            verdict = await ask(link)
            if verdict is None:
                continue
            self._report(transaction, link, stage, verdict)
            if verdict.name == "discard":
                self._note(transaction)["discard"] = link.address
                return DECLINED  # the message is accepted: no other milter is asked
            if verdict.result is not DECLINED:
                return verdict.result, verdict.message
        return DECLINED

    def _report(self, transaction: Any, link: MilterLink, stage: str, verdict: Verdict) -> None:
        """One log line (event ``milter``, counted by the metrics) and one verdict note."""
        why = f" ({verdict.detail})" if verdict.detail else ""
        text = verdict.message if isinstance(verdict.message, str) else None
        level = self.events.warn if verdict.name == "error" else self.events.info
        level(
            "{conn_id} milter {milter} at {stage}: {verdict}{why}",
            event="milter", milter=link.address, stage=stage, verdict=verdict.name, why=why,
            reply=text, edits=list(verdict.edits), conn_id=transaction.connection.id,
        )  # fmt: skip
        record(transaction, self.name, verdict.name, verdict.detail or (text or ""),
               stage=stage, milter=link.address, action=verdict.result.name.lower())  # fmt: skip
        self._note(transaction)["verdicts"].append(
            {"milter": link.address, "stage": stage, "verdict": verdict.name,
             "reply": verdict.message, "edits": list(verdict.edits)}
        )  # fmt: skip

    # -- hooks ----------------------------------------------------------------------------
    async def hook_connect(self, transaction: Any) -> Any:
        reactor = _reactor()
        links = [MilterLink(reactor, address, self.timeouts, self.default_action)
                 for address in self.addresses]  # fmt: skip
        transaction.connection.notes.setdefault(_LINKS, {})[self._key] = links
        opened = await defer.gatherResults([defer.ensureDeferred(link.open()) for link in links])
        failures = {id(link): failure for link, failure in zip(links, opened, strict=True)}
        connection = transaction.connection
        family = {4: b"4", 6: b"6"}.get(_version(connection.remote_ip), b"U")
        name = connection.remote_host if connection.remote_host_verified else None
        hello = codec.Connect(
            name or f"[{connection.remote_ip or 'unix'}]", family,
            connection.remote_port or 0, connection.remote_ip or "",
        )  # fmt: skip
        macros = self._macros(transaction)

        async def ask(link: MilterLink) -> Verdict | None:
            return failures[id(link)] or await link.ask(hello, macros)

        return await self._each(transaction, "connect", ask)

    async def hook_helo(self, transaction: Any, host: str) -> Any:
        return await self._each(
            transaction, "helo",
            lambda link: link.ask(codec.Helo(host), self._macros(transaction)),
        )  # fmt: skip

    hook_ehlo = hook_helo

    async def hook_mail(self, transaction: Any, sender: Any, params: dict[str, Any]) -> Any:
        args = (sender.format(), *_esmtp(params))
        macros = self._macros(transaction, mail_macros(transaction, sender))

        async def ask(link: MilterLink) -> Any:
            link.abort()  # a MAIL the milter saw before, refused afterwards by a plugin
            verdict = await link.ask(codec.Mail(args), macros)
            link.in_message = True
            return verdict

        return await self._each(transaction, "mail", ask)

    async def hook_rcpt(self, transaction: Any, recipient: Any, params: dict[str, Any]) -> Any:
        if self._note(transaction)["discard"]:
            return DECLINED
        args = (recipient.format(), *_esmtp(params))
        macros = self._macros(transaction, rcpt_macros(transaction, recipient, self.local_domains))
        return await self._each(
            transaction, "rcpt", lambda link: link.ask(codec.Rcpt(args), macros)
        )

    async def hook_data(self, transaction: Any) -> Any:
        if self._note(transaction)["discard"]:
            return DECLINED
        macros = self._macros(transaction)
        return await self._each(transaction, "data", lambda link: link.ask(codec.Data(), macros))

    async def hook_data_post(self, transaction: Any) -> Any:
        note = self._note(transaction)
        if note["discard"]:
            return DECLINED
        macros = self._macros(transaction)

        async def ask(link: MilterLink) -> Verdict | None:
            verdict = await link.message(transaction, _body(transaction), macros)
            if verdict is not None and verdict.quarantine is not None:
                reason = verdict.quarantine
                note["quarantine"].append({"milter": link.address, "reason": reason})
                transaction.header.add(QUARANTINE_FIELD, f"{_safe(reason)} ({link.address})", 0)
            if verdict is not None and verdict.name == "continue":
                self._report(transaction, link, "data_post", verdict)
                return None
            return verdict

        return await self._each(transaction, "data_post", ask)

    def hook_queue(self, transaction: Any) -> Any:
        """A discarded message is accepted here, before any queue plugin stores it."""
        discarded = (transaction.notes.get(NOTE) or {}).get("discard")
        if discarded:
            self.log.info("{txn} discarded as {milter} asked", txn=transaction.id,
                          milter=discarded)  # fmt: skip
            return OK, f"2.0.0 Queued as {transaction.id}"
        return DECLINED

    def hook_reset_transaction(self, transaction: Any) -> None:
        for link in self._links(transaction):
            link.abort()

    def hook_disconnect(self, transaction: Any) -> None:
        for link in self._links(transaction):
            link.quit()
        transaction.connection.notes.get(_LINKS, {}).pop(self._key, None)


def _version(address: str | None) -> int:
    if not address:
        return 0
    return 6 if ":" in address else 4


def _esmtp(params: dict[str, Any]) -> list[str]:
    return [key if value is None else f"{key}={value}" for key, value in params.items()]


def _safe(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:200]


async def _body(transaction: Any) -> AsyncIterator[bytes]:
    """The body in chunks the milter protocol allows; a spooled body is read in a worker
    thread, so the reactor never waits on the disk."""
    pieces = transaction.body_chunks(MAX_BODY_CHUNK)
    spooled = transaction.spool_path is not None
    while True:
        piece = await run_in_pool("milter", next, pieces, None) if spooled else next(pieces, None)
        if piece is None:
            return
        for start in range(0, len(piece), MAX_BODY_CHUNK):
            yield piece[start : start + MAX_BODY_CHUNK]
