"""queue/maildir end to end: per-recipient templates, durability order, full or broken disks.

The disk-full tests mount a small tmpfs (root with CAP_SYS_ADMIN, as in CI's container);
where that is not allowed they skip. A broken Maildir (a file where a directory must be)
needs no privilege and stands for any other write error.

Durability: the file is fsynced in ``tmp/``, renamed into ``new/`` and the directory
fsynced, all before the client is told 250. A crash cannot be staged from a test, so the
order of the system calls is what is checked: ``os.fsync`` and ``os.rename`` are wrapped
(the real calls still happen) and the sequence is compared with what a ``queue_post``
plugin sees, which runs after the queue hook and before the reply leaves.
"""

from __future__ import annotations

import contextlib
import os
import smtplib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from qpconn.plugins import Plugin
from qpconn.plugins.queue.maildir import expand
from tests.e2e_client import Client
from tests.support.server import in_thread


def send(
    address: tuple[str, int], rcpts: list[str], text: bytes = b"Subject: t\r\n\r\nhello"
) -> tuple[int, str]:
    with Client(address, timeout=15) as client:
        assert client.cmd("EHLO client.test").code == 250
        reply = client.transaction("<a@example.org>", rcpts, text)
        client.cmd("QUIT")
    return reply.code, reply.text


def files(directory: Path) -> list[bytes]:
    return [(directory / n).read_bytes() for n in sorted(os.listdir(directory))]


def maildir_server(qpconn_server: Any, path: str, **files: Any) -> Any:
    return qpconn_server(files=files, plugins=["relay", "rcpt_ok", f"queue/maildir {path}"])


@pytest_twisted.ensureDeferred
async def test_one_copy_per_recipient_directory(qpconn_server, tmp_path):
    server = maildir_server(qpconn_server, f"{tmp_path}/mail/%d/%u")
    rcpts = ["<Joe+lists@MX.test>", "<joe@mx.test>", "<other@localhost>"]
    code, text = await in_thread(send, server.address, rcpts)
    assert code == 250, text
    joe, other = tmp_path / "mail/mx.test/joe", tmp_path / "mail/localhost/other"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "mail").glob("*/*")) == [
        "mail/localhost/other",
        "mail/mx.test/joe",
    ]
    (first,) = files(joe / "new")
    (second,) = files(other / "new")
    # One copy for Joe's two addresses, with both Delivered-To lines; one for other@.
    assert first.startswith(
        b"Return-Path: <a@example.org>\nDelivered-To: Joe+lists@MX.test\n"
        b"Delivered-To: joe@mx.test\nReceived: "
    )
    assert second.startswith(b"Return-Path: <a@example.org>\nDelivered-To: other@localhost\n")
    assert first.endswith(b"\n\nhello\n") and second.endswith(b"\n\nhello\n")
    for maildir in (joe, other):
        assert os.listdir(maildir / "tmp") == [] and os.listdir(maildir / "cur") == []
    assert (await in_thread(send, server.address, ["<joe-x@mx.test>"]))[0] == 250
    assert len(files(joe / "new")) == 2  # %u drops the -x extension too


@pytest_twisted.ensureDeferred
async def test_local_part_template_keeps_the_extension(qpconn_server, tmp_path):
    server = maildir_server(qpconn_server, f"{tmp_path}/%l@%d")
    assert (await in_thread(send, server.address, ["<joe+lists@mx.test>"]))[0] == 250
    assert len(files(tmp_path / "joe+lists@mx.test" / "new")) == 1


def test_template_values_cannot_leave_the_tree():
    assert expand("/m/%d/%l", "../../etc", "mx.test") == "/m/mx.test/_.._.._etc"
    assert expand("/m/%d/%u", "..", "..") == "/m/_../_.."
    assert expand("/m/%u", "a/b+c", "x") == "/m/a_b"
    assert expand("/m/%d/%u", "", "") == "/m/_/_"


@pytest_twisted.ensureDeferred
async def test_broken_maildir_is_451_nothing_half_written_and_serving_goes_on(
    qpconn_server, tmp_path
):
    base = tmp_path / "mail"
    (base / "mx.test").mkdir(parents=True)
    (base / "mx.test" / "broken").write_text("a file where a Maildir should be")
    server = maildir_server(qpconn_server, f"{base}/%d/%u")
    code, text = await in_thread(send, server.address, ["<ok@mx.test>", "<broken@mx.test>"])
    assert code == 451 and text.startswith("4.3.0 Could not store the message"), text
    # The copy written before the failure stays (the retry duplicates it, never loses it);
    # the failed one left nothing behind.
    ok = base / "mx.test" / "ok"
    assert len(files(ok / "new")) == 1 and os.listdir(ok / "tmp") == []
    assert (await in_thread(send, server.address, ["<ok@mx.test>"]))[0] == 250
    assert len(files(ok / "new")) == 2


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


@pytest_twisted.ensureDeferred
async def test_full_disk_is_452_nothing_half_written_and_serving_goes_on(qpconn_server, tmp_path):
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        server = maildir_server(qpconn_server, str(disk / "maildir"))
        big = b"Subject: big\r\n\r\n" + b"\r\n".join([b"x" * 998] * 400)  # ~400 KB
        code, text = await in_thread(send, server.address, ["<user@mx.test>"], big)
        assert (code, text) == (452, "4.3.1 Insufficient system storage")
        assert os.listdir(disk / "maildir" / "new") == []
        assert os.listdir(disk / "maildir" / "tmp") == []  # the partial file was removed
        # The server is fine, and a message that fits is stored.
        code, _ = await in_thread(send, server.address, ["<user@mx.test>"])
        assert code == 250
        assert len(os.listdir(disk / "maildir" / "new")) == 1


@pytest_twisted.ensureDeferred
async def test_full_spool_disk_is_452_and_serving_goes_on(qpconn_server, tmp_path):
    with small_tmpfs(tmp_path / "spool", "128k") as spool:
        server = qpconn_server(files={"spool_dir": str(spool), "size_threshold": "16384"})
        big = b"Subject: big\r\n\r\n" + b"\r\n".join([b"y" * 998] * 300)  # ~300 KB
        code, text = await in_thread(send, server.address, ["<user@mx.test>"], big)
        assert (code, text) == (452, "4.3.1 Insufficient system storage"), text
        assert os.listdir(spool) == []  # the spool file is gone with the transaction
        assert server.messages() == []
        assert (await in_thread(send, server.address, ["<user@mx.test>"], big[:40000]))[0] == 250
        assert len(server.messages()) == 1
        assert os.listdir(spool) == []


# -- durability: fsync, rename, fsync the directory, then 250 --------------------------------
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
    tmp_name = name.rpartition(",S=")[0]  # the size joins the name at the rename
    tmp_file, new_file = str(maildir / "tmp" / tmp_name), str(maildir / "new" / name)
    # Only what concerns the Maildir (other parts of the server may sync their own files).
    events = [(kind, what) for kind, what in events if kind == "queue_post" or str(maildir) in what]
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "rename", "fsync", "queue_post"], events
    assert events[0][1] == tmp_file  # the file's data, while it is still in tmp/
    assert events[1][1] == f"{tmp_file} -> {new_file}"
    assert events[2][1] == str(maildir / "new")  # the directory entry of the rename
