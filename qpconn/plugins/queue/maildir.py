"""queue/maildir [PATH] [line_endings=lf|crlf]: store mail in a Maildir, durably, before the 250.

Delivery follows the Maildir protocol: the message is written under ``tmp/``, the file is
fsynced, renamed into ``new/`` and the directory fsynced. Only then is the queue hook
answered OK, so a 250 means the message survives a crash or power cut, and a reader never
sees a half-written file in ``new/``.

Lines end in LF in the stored file, as every Maildir reader expects (qmail, Postfix's
local and virtual delivery, Dovecot, mutt): SMTP's CRLF is the wire's line ending, not the
mailbox's. The file in ``new/`` is named with ``,S=<size>``, the size of the file as
stored, which Dovecot reads instead of a ``stat``. ``line_endings=crlf`` keeps the bytes
as received (for a reader that wants CRLF); the size is then that of the CRLF file.

PATH may hold qpsmtpd's templates: ``%d`` (recipient domain), ``%l`` (local part) and
``%u`` (user, the local part up to any ``+`` or ``-`` extension). Then each recipient's
Maildir gets its own copy (one copy per distinct directory), each durable before the 250.

The disk work (write, fsync, rename, directory fsync) runs in a bounded pool of worker
threads of its own (:func:`qpconn.kit.threads.run_in_batch_pool` ``"maildir"``), so many
sessions flush in parallel instead of queueing behind one fsync, and the reactor thread
never waits for the disk. Deliveries that finish together are handed back to the reactor
in one wake-up (:mod:`qpconn.kit.batchpool`), not one each. Renames into the same
``new/`` that happen together share one directory fsync (:mod:`qpconn.kit.groupsync`): each
delivery still waits for an fsync of ``new/`` begun after its own rename, so the order file
fsync, rename, directory fsync, 250 is unchanged.

A crash (or kill -9) while a message is being written leaves its file in ``tmp/``, where
nothing ever looks again. When the plugin starts it removes the files in ``tmp/`` not
written nor read for 36 hours, the qmail and Dovecot convention: no delivery in progress
is that old (:func:`clean_tmp`).
"""

from __future__ import annotations

import errno
import glob
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from itertools import count
from typing import Any

from qpconn.hooks.results import DENYSOFT, DONE, OK, Result
from qpconn.kit.groupsync import sync_directory
from qpconn.kit.threads import run_in_batch_pool
from qpconn.plugins import Plugin

__all__ = ["Maildir", "clean_tmp", "deliver", "ensure_maildir", "lf_lines"]

_sequence = count(1)
#: a new file in tmp/, ours alone, not inherited by children (queue/exec, queue/fork)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
#: octets gathered before one write: a 1 KiB message is one write, a 50 MB one is written
#: in pieces of this size rather than joined whole in memory
WRITE_SIZE = 1 << 18
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_TEMPLATE = re.compile(r"%[dlu]")
#: worker threads for deliveries: enough for many sessions' fsyncs to overlap (each
#: delivery waits for two flushes, its file's and new/'s, so one worker stores at most
#: POOL_SIZE / (2 x flush latency) messages per second), bounded so a burst cannot start
#: hundreds of threads; they are started only as deliveries are in flight at once. 64
#: against 16, on the benchmark's disk while other work flushed it (a 1 KiB file's fsync
#: 0.4 ms at the median, 4.5 ms at p90): ii +9% msg/s (4 rounds of 4 faster), CPU per
#: message the same (bench/RESULTS.md, 2026-12-08).
POOL_SIZE = 64


#: files in tmp/ untouched for this long are left over from a crash (qmail, Dovecot: 36 h)
TMP_MAX_AGE = 36 * 3600


def clean_tmp(path: str, max_age: float = TMP_MAX_AGE, now: float | None = None) -> list[str]:
    """Remove the files in ``path``/tmp neither modified nor read for ``max_age`` seconds.

    Returns the names removed. Subdirectories are left alone, and a file that vanishes
    meanwhile (another worker cleaning the same Maildir) is not an error.
    """
    limit = (time.time() if now is None else now) - max_age
    removed = []
    try:
        entries = list(os.scandir(os.path.join(path, "tmp")))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if entry.is_dir(follow_symlinks=False):
                continue
            if info.st_mtime < limit and info.st_atime < limit:
                os.unlink(entry.path)
                removed.append(entry.name)
        except FileNotFoundError:
            continue
    return removed


def template_maildirs(template: str) -> list[str]:
    """The Maildirs that exist for a path template (each template as ``*``).

    Only directories holding tmp/, new/ and cur/ count: a template such as ``/home/%u``
    must not make a user's own ``~/tmp`` look like a Maildir's.
    """
    pattern = "*".join(glob.escape(part) for part in _TEMPLATE.split(template))
    return [
        path
        for path in sorted(glob.glob(pattern))
        if all(os.path.isdir(os.path.join(path, sub)) for sub in ("tmp", "new", "cur"))
    ]


def ensure_maildir(path: str) -> None:
    """Create ``path`` with its tmp/new/cur subdirectories if they are missing."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


_host: str | None = None


def _maildir_host() -> str:
    """The host name as Maildir names spell it (``/`` and ``:`` escaped), read once."""
    global _host
    if _host is None:
        _host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    return _host


_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


# glibc no longer caches getpid(): one system call per message saved, kept right in a child.
os.register_at_fork(after_in_child=_forked)


def unique_name(queue_id: str) -> str:
    """A Maildir file name: time, microseconds, pid, our queue id and the host name."""
    now = time.time()
    host = _maildir_host()
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{_pid}Q{queue_id}_{next(_sequence)}.{host}"


def lf_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``chunks`` with every CRLF turned into LF, however the chunks split them.

    A CR that ends a chunk is held back until the next chunk shows whether an LF follows
    it; a CR not followed by LF (possible in BINARYMIME content) is kept as it is.
    """
    held = b""
    for chunk in chunks:
        if not chunk:
            continue
        data = held + chunk
        held = b""
        if data.endswith(b"\r"):
            data, held = data[:-1], b"\r"
        yield data.replace(b"\r\n", b"\n")
    if held:
        yield held


def deliver(
    maildir: str, name: str, prefix: bytes, chunks: Iterable[bytes], *, crlf: bool = False
) -> str:
    """Write one message into ``maildir`` durably; return the path in ``new/``.

    ``prefix`` and ``chunks`` are the message as received, lines ending in CRLF; they are
    stored with LF line endings unless ``crlf``. The name in ``new/`` is ``name`` with
    ``,S=<size>`` (the size of the stored file) added.

    Runs in a worker thread. On any failure the file in ``tmp/`` is removed and the error
    propagates: nothing half-written ever appears in ``new/``.

    The system calls are the fewest the Maildir protocol allows, since each one made from a
    worker thread gives up and takes back the GIL, which the reactor thread is waiting
    for: ``open`` (``O_CLOEXEC``, so a ``queue/exec`` child never inherits it), one
    ``write`` for a message of up to :data:`WRITE_SIZE` octets, ``fsync``, ``close``,
    ``rename``, and the directory's shared fsync. Not through a Python file object, whose
    creation alone costs an ``fstat``, an ``ioctl`` and an ``lseek``.
    """
    tmp_path = os.path.join(maildir, "tmp", name)
    try:
        fd = os.open(tmp_path, _CREATE, 0o600)
    except FileNotFoundError:
        # First delivery to this Maildir (or it was removed): create it, then try again.
        # Not checked up front: three mkdir calls per message for what is nearly always there.
        ensure_maildir(maildir)
        fd = os.open(tmp_path, _CREATE, 0o600)
    try:
        try:
            pieces = _prepend(prefix, chunks)
            size = _write_pieces(fd, pieces if crlf else lf_lines(pieces))
            os.fsync(fd)
        finally:
            os.close(fd)
        new_path = os.path.join(maildir, "new", f"{name},S={size}")
        try:
            os.rename(tmp_path, new_path)
        except FileNotFoundError:  # new/ removed meanwhile
            ensure_maildir(maildir)
            os.rename(tmp_path, new_path)
        # Shared with renames into the same new/ made meanwhile by other workers.
        sync_directory(os.path.join(maildir, "new"))
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise
    return new_path


def _write_pieces(fd: int, pieces: Iterable[bytes]) -> int:
    """Write ``pieces`` to ``fd`` in as few ``write`` calls as :data:`WRITE_SIZE` allows;
    return the number of octets written."""
    size = 0
    batch: list[bytes] = []
    batched = 0
    for piece in pieces:
        batch.append(piece)
        batched += len(piece)
        if batched >= WRITE_SIZE:
            size += _write_all(fd, b"".join(batch))
            batch, batched = [], 0
    if batch:
        size += _write_all(fd, b"".join(batch) if len(batch) > 1 else batch[0])
    return size


def _write_all(fd: int, data: bytes) -> int:
    """``os.write`` until all of ``data`` is written (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


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

    def register(self, *args: str) -> None:
        words = list(args)
        #: store lines as received (CRLF) rather than as Maildir readers expect (LF)
        self.crlf = False
        for word in list(words):
            if word.startswith("line_endings="):
                value = word.partition("=")[2].lower()
                if value not in ("lf", "crlf"):
                    raise ValueError(f"line_endings must be lf or crlf, not {value!r}")
                self.crlf = value == "crlf"
                words.remove(word)
        if len(words) > 1:
            raise ValueError(f"takes one path, got extra arguments {' '.join(words[1:])!r}")
        path = words[0] if words else "./maildir"
        self.template = self.config.path(path)
        self.per_recipient = bool(_TEMPLATE.search(path))
        if not self.per_recipient:
            ensure_maildir(self.template)
        self.sweep_tmp()

    def sweep_tmp(self) -> None:
        """Remove what crashed deliveries left in tmp/ (see :func:`clean_tmp`)."""
        paths = template_maildirs(self.template) if self.per_recipient else [self.template]
        for path in paths:
            try:
                removed = clean_tmp(path)
            except OSError as exc:
                self.log.warn("cannot clean {path}/tmp: {error}", path=path, error=exc)
                continue
            if removed:
                self.log.info(
                    "removed {count} stale file(s) from {path}/tmp (crashed deliveries)",
                    count=len(removed),
                    path=path,
                )

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
            written = await run_in_batch_pool(
                "maildir", POOL_SIZE, self._deliver_all, jobs, head, transaction, self.crlf
            )
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
        jobs: list[tuple[str, str, bytes]], head: bytes, transaction: Any, crlf: bool
    ) -> list[str]:
        written = []
        for path, name, prefix in jobs:
            chunks = _prepend(head, transaction.body_chunks())
            written.append(deliver(path, name, prefix, chunks, crlf=crlf))
        return written


def _prepend(first: bytes, rest: Iterable[bytes]) -> Iterable[bytes]:
    yield first
    yield from rest
