"""queue/maildir PATH: store accepted mail in a Maildir, durably, before saying 250.

Delivery follows the Maildir protocol: the message is written under ``tmp/``, the file is
fsynced, renamed into ``new/`` and the directory fsynced. Only then is the queue hook
answered OK, so a 250 means the message survives a crash or power cut, and a reader never
sees a half-written file in ``new/``.

PATH may hold qpsmtpd's templates: ``%d`` (recipient domain), ``%l`` (local part) and
``%u`` (user, the local part up to any ``+`` or ``-`` extension). Then each recipient's
Maildir gets its own copy (one copy per distinct directory), each durable before the 250.

The disk work runs in the reactor's thread pool, so many sessions flush in parallel
instead of queueing behind one fsync.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import time
from collections.abc import Iterable
from itertools import count
from typing import Any

from twisted.internet import threads

from qpconn.plugins import Plugin
from qpconn.results import DENYSOFT, DONE, OK, Result

__all__ = ["Maildir", "deliver", "ensure_maildir"]

_sequence = count(1)
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_TEMPLATE = re.compile(r"%[dlu]")


def ensure_maildir(path: str) -> None:
    """Create ``path`` with its tmp/new/cur subdirectories if they are missing."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_name(queue_id: str) -> str:
    """A Maildir file name: time, microseconds, pid, our queue id and the host name."""
    now = time.time()
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{queue_id}_{next(_sequence)}.{host}"


def deliver(maildir: str, name: str, prefix: bytes, chunks: Iterable[bytes]) -> str:
    """Write one message into ``maildir`` durably; return the path in ``new/``.

    Runs in a worker thread. On any failure the file in ``tmp/`` is removed and the error
    propagates: nothing half-written ever appears in ``new/``.
    """
    ensure_maildir(maildir)
    tmp_path = os.path.join(maildir, "tmp", name)
    new_path = os.path.join(maildir, "new", name)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(prefix)
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp_path, new_path)
        _fsync_dir(os.path.join(maildir, "new"))
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise
    return new_path


def _path_part(value: str) -> str:
    """A template value safe as one directory name: no separators, no dot-only names."""
    cleaned = re.sub(r"[^A-Za-z0-9._+=-]", "_", value.lower())
    return "_" + cleaned if cleaned in ("", ".", "..") or cleaned.startswith(".") else cleaned


def expand(template: str, local: str, domain: str) -> str:
    """Fill %d, %l and %u in a path template for one recipient."""
    user = re.split(r"[+-]", local, maxsplit=1)[0] or local
    values = {"%d": _path_part(domain), "%l": _path_part(local), "%u": _path_part(user)}
    return _TEMPLATE.sub(lambda match: values[match.group(0)], template)


class Maildir(Plugin):
    """Queue plugin writing to a Maildir (or one Maildir per recipient with templates)."""

    def register(self, path: str = "./maildir", *rest: str) -> None:
        if rest:
            raise ValueError(f"takes one path, got extra arguments {' '.join(rest)!r}")
        self.template = self.config.path(path)
        self.per_recipient = bool(_TEMPLATE.search(path))
        if not self.per_recipient:
            ensure_maildir(self.template)

    def targets(self, transaction: Any) -> dict[str, list[Any]]:
        """Maildir path -> the recipients delivered there."""
        if not self.per_recipient:
            return {self.template: list(transaction.recipients)}
        paths: dict[str, list[Any]] = {}
        for rcpt in transaction.recipients:
            path = expand(self.template, rcpt.user or "", rcpt.host or "")
            paths.setdefault(path, []).append(rcpt)
        return paths

    async def hook_queue(self, transaction: Any) -> Result | tuple[Result, str]:
        sender = transaction.sender.format() if transaction.sender else "<>"
        jobs = []
        for path, rcpts in self.targets(transaction).items():
            lines = [f"Return-Path: {sender}\r\n"]
            lines += [f"Delivered-To: {rcpt.address}\r\n" for rcpt in rcpts]
            prefix = "".join(lines).encode("utf-8")
            jobs.append((path, unique_name(transaction.id), prefix))
        # Header bytes are made here, in the reactor thread; the body is read in the worker.
        head = next(iter(transaction.message_chunks()))
        try:
            written = await threads.deferToThread(self._deliver_all, jobs, head, transaction)
        except OSError as exc:
            self.log.error(
                "{queue_id} maildir delivery failed: {error}", queue_id=transaction.id, error=exc
            )
            if exc.errno in _NO_SPACE:
                return DENYSOFT, "4.3.1 Insufficient system storage"
            return DONE, f"451 4.3.0 Could not store the message: {exc.strerror or exc}"
        transaction.notes["maildir"] = written
        return OK, f"2.0.0 Queued as {transaction.id}"

    @staticmethod
    def _deliver_all(
        jobs: list[tuple[str, str, bytes]], head: bytes, transaction: Any
    ) -> list[str]:
        written = []
        for path, name, prefix in jobs:
            chunks = _prepend(head, transaction.body_chunks())
            written.append(deliver(path, name, prefix, chunks))
        return written


def _prepend(first: bytes, rest: Iterable[bytes]) -> Iterable[bytes]:
    yield first
    yield from rest
