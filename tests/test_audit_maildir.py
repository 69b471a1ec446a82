"""Issue 2, ``queue/maildir``: the file is fsynced in ``tmp/``, renamed into ``new/`` and the
directory fsynced, all before the client is told 250.

A crash cannot be staged from a test, so the order of the system calls is what is
checked: ``os.fsync`` and ``os.rename`` are wrapped (the real calls still happen) and
the sequence is compared with what a ``queue_post`` plugin sees, which runs after the
queue hook and before the reply leaves.
"""

from __future__ import annotations

import os
import smtplib
import threading
from typing import Any

import pytest_twisted

from qpconn.plugins import Plugin
from tests.support.server import in_thread

_lock = threading.Lock()


class QueuePost(Plugin):
    """queue_post: marks the moment in the shared sequence."""

    def register(self) -> None:
        self.events: list[tuple[str, str]] = []

    def hook_queue_post(self, transaction: Any) -> None:
        with _lock:
            self.events.append(("queue_post", transaction.id))


@pytest_twisted.ensureDeferred
async def test_fsync_rename_fsync_directory_then_250(qpconn_server, tmp_path, monkeypatch):
    maildir = tmp_path / "store"
    post = QueuePost(None, "post")  # type: ignore[arg-type]
    events = post.events
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        with _lock:
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        with _lock:
            events.append(("rename", f"{src} -> {dst}"))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    server = qpconn_server(plugins=["rcpt_ok", f"queue/maildir {maildir}", post])

    def client() -> dict:
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            return smtp.sendmail("a@example.org", ["user@mx.test"], b"Subject: x\r\n\r\ny\r\n")

    assert await in_thread(client) == {}
    (name,) = os.listdir(maildir / "new")
    assert os.listdir(maildir / "tmp") == []
    tmp_file, new_file = str(maildir / "tmp" / name), str(maildir / "new" / name)
    # Only what concerns the Maildir (other parts of the server may sync their own files).
    events = [(kind, what) for kind, what in events if kind == "queue_post" or str(maildir) in what]
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "rename", "fsync", "queue_post"], events
    assert events[0][1] == tmp_file  # the file's data, while it is still in tmp/
    assert events[1][1] == f"{tmp_file} -> {new_file}"
    assert events[2][1] == str(maildir / "new")  # the directory entry of the rename
