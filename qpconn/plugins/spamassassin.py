"""spamassassin: score each message with spamd, add X-Spam headers, refuse above a threshold.

At ``data_post`` the message (with our ``Received`` on top, which SpamAssassin reads) is
sent to spamd (SpamAssassin's daemon) with the spamd protocol's ``SYMBOLS`` request over TCP
or a unix socket (``spamd_socket``, default ``127.0.0.1:783``). spamd answers with the
score, its threshold and the names of the rules that hit. The message then gets, on top, in
place of the ``X-Spam-Flag``/``-Status``/``-Level`` fields it came with (removed before the
scan, and also when the scan fails: a sender must not pass its own verdict along):

* ``X-Spam-Flag: YES`` when spamd calls it spam;
* ``X-Spam-Status: Yes, score=15.3 required=5.0 tests=GTUBE,MISSING_DATE``;
* ``X-Spam-Level: ***************`` (one star per whole point, at most 50).

With ``reject_threshold N`` a score of N or more is refused: ``550 5.7.1 Spam score 15.3
exceeds the threshold``. When spamd cannot be reached, fails, or does not answer within
``timeout`` seconds (default 30), ``on_error accept`` (the default: a missing score does
not make mail spam) accepts the message unscored, and ``on_error tempfail`` gives
``451 4.7.1`` so the sender retries. Messages over ``max_size`` octets (default 500000,
spamc's limit) are not scanned. The result is in ``transaction.notes["spamassassin"]``
(``{"spam", "score", "required", "tests", "subject_tagged"}``) and a verdict.

With ``munge_subject_threshold N`` (qpsmtpd's option) a message scoring N or more that is
accepted gets its ``Subject`` tagged: ``subject_prefix`` (default ``*** SPAM ***``; one
word when set, as plugin arguments are split at spaces) and a space go before the value,
which is otherwise kept as it came. A Subject already tagged is not tagged twice; a
message without one gets ``Subject: *** SPAM ***``. This changes a field DKIM signs, so
list the plugin after ``dkim`` and ``dmarc``.

Arguments: ``spamd_socket HOST:PORT|/path``, ``spamd_user NAME``, ``reject_threshold N``,
``timeout N``, ``on_error accept|tempfail``, ``max_size N``, ``munge_subject_threshold N``,
``subject_prefix TEXT``.
"""

from __future__ import annotations

import re
from typing import Any

from qpconn.hooks.results import DECLINED, DONE
from qpconn.hooks.verdicts import record
from qpconn.kit.policy import parse_options
from qpconn.kit.scanclient import ScanError, endpoint, exchange
from qpconn.kit.threads import run_in_pool
from qpconn.plugins import Plugin
from qpconn.plugins.dkim import message_bytes

__all__ = ["SpamAssassin", "NOTE", "parse_answer"]

NOTE = "spamassassin"
#: the fields we write; removed from incoming mail before the scan
SPAM_FIELDS = ("X-Spam-Flag", "X-Spam-Status", "X-Spam-Level")
_STATUS = re.compile(rb"^SPAMD/\d+\.\d+\s+(\d+)\s*(.*)$")
_SPAM = re.compile(r"^\s*(True|False|Yes|No)\s*;\s*(-?[\d.]+)\s*/\s*(-?[\d.]+)\s*$", re.I)
_SYMBOL = re.compile(r"[A-Za-z0-9_.-]+\Z")


def parse_answer(data: bytes) -> tuple[bool, float, float, list[str]]:
    """(spam, score, required, tests) from a spamd answer; ScanError if it is not one."""
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    match = _STATUS.match(lines[0]) if lines else None
    if match is None:
        raise ScanError(f"not a spamd answer: {data[:80]!r}")
    if match.group(1) != b"0":
        raise ScanError(f"spamd error {match.group(1).decode()}: {match.group(2).decode()}")
    spam = None
    for line in lines[1:]:
        name, _, value = line.decode("utf-8", "replace").partition(":")
        if name.strip().lower() == "spam":
            spam = _SPAM.match(value)
    if spam is None or not sep:
        raise ScanError("spamd answer without a Spam header")
    text = body.decode("utf-8", "replace").strip()
    tests = [t.strip() for t in text.split(",") if _SYMBOL.match(t.strip())]
    flag = spam.group(1).lower() in ("true", "yes")
    return flag, float(spam.group(2)), float(spam.group(3)), tests


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class SpamAssassin(Plugin):
    """Asks spamd about each message at ``data_post``; see the module docstring."""

    def register(self, *args: str) -> None:
        options = parse_options(
            self.name,
            args,
            {"spamd_socket": "127.0.0.1:783", "spamd_user": "", "reject_threshold": "",
             "timeout": "30", "on_error": "accept", "max_size": "500000",
             "munge_subject_threshold": "", "subject_prefix": "*** SPAM ***"},
            {"on_error": ("accept", "tempfail")},
            numbers=["timeout", "max_size", "munge_subject_threshold"],
        )  # fmt: skip
        self.address = options["spamd_socket"]
        endpoint(None, self.address, 1.0)  # a bad address stops the start
        self.user = options["spamd_user"]
        if self.user and not _SYMBOL.match(self.user):
            raise ValueError(f"spamd_user {self.user!r} is not a plain user name")
        threshold = options["reject_threshold"]
        self.threshold = float(threshold) if threshold else None
        munge = options["munge_subject_threshold"]
        self.munge_threshold = float(munge) if munge else None
        self.subject_prefix = options["subject_prefix"]
        if not self.subject_prefix.isprintable():
            raise ValueError("subject_prefix must be printable text")
        self.scan_timeout = float(options["timeout"])
        self.on_error = options["on_error"]
        self.max_size = int(float(options["max_size"]))
        # the hook may take the scan plus reading the spooled message
        self.timeout = self.scan_timeout + 10

    async def hook_data_post(self, transaction: Any) -> Any:
        for name in SPAM_FIELDS:  # a sender's own verdict goes, scanned or not
            transaction.header.delete(name)
        message = await run_in_pool("auth", message_bytes, transaction)
        if len(message) > self.max_size:
            record(transaction, self.name, "skip", f"{len(message)} octets > max_size")
            return DECLINED
        request = [
            b"SYMBOLS SPAMC/1.5\r\n",
            b"Content-length: %d\r\n" % len(message),
            (f"User: {self.user}\r\n".encode("ascii") if self.user else b""),
            b"\r\n",
            message,
        ]
        try:
            answer = await exchange(_reactor(), self.address, request, self.scan_timeout)
            spam, score, required, tests = parse_answer(answer)
        except ScanError as exc:
            return self._failed(transaction, str(exc))
        transaction.notes[NOTE] = {"spam": spam, "score": score, "required": required,
                                   "tests": tests, "subject_tagged": False}  # fmt: skip
        self._headers(transaction, spam, score, required, tests)
        reason = f"score {score:g} required {required:g}"
        if self.threshold is not None and score >= self.threshold:
            record(transaction, self.name, "spam", reason, action="reject")
            return DONE, f"550 5.7.1 Spam score {score:g} exceeds the threshold"
        if self.munge_threshold is not None and score >= self.munge_threshold:
            transaction.notes[NOTE]["subject_tagged"] = self._tag_subject(transaction)
        record(transaction, self.name, "spam" if spam else "ham", reason, action="accept")
        return DECLINED

    def _tag_subject(self, transaction: Any) -> bool:
        """Put the prefix before the Subject unless it is there already."""
        header = transaction.header
        subject = header.get("Subject")
        if subject is None:
            header.add("Subject", self.subject_prefix)
            return True
        if subject.strip().startswith(self.subject_prefix):
            return False
        return header.prefix("Subject", self.subject_prefix)

    def _failed(self, transaction: Any, why: str) -> Any:
        self.log.warn("spamassassin: {address}: {error}", address=self.address, error=why)
        action = "tempfail" if self.on_error == "tempfail" else "accept"
        record(transaction, self.name, "temperror", why, action=action)
        if action == "tempfail":
            return DONE, "451 4.7.1 Spam scanner unavailable; try again later"
        return DECLINED

    @staticmethod
    def _headers(transaction: Any, spam: bool, score: float, required: float,
                 tests: list[str]) -> None:  # fmt: skip
        header = transaction.header
        stars = "*" * min(50, max(0, int(score)))
        status = f"{'Yes' if spam else 'No'}, score={score:.1f} required={required:.1f}"
        status += f" tests={','.join(tests) or 'none'}"
        header.add("X-Spam-Level", stars, index=0)
        header.add("X-Spam-Status", status, index=0)
        if spam:
            header.add("X-Spam-Flag", "YES", index=0)
