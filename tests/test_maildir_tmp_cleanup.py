"""queue/maildir removes what crashed deliveries left in tmp/ when the server starts.

A kill -9 while a message is written leaves its file in ``tmp/``; files there untouched
for 36 hours are removed (the qmail and Dovecot convention), fresher ones are deliveries
that may still be in progress and stay, and nothing outside ``tmp/`` is touched.
"""

from __future__ import annotations

import os
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest_twisted

from tests.support.server import in_thread

HOUR = 3600


def make_file(path: Path, age_hours: float) -> Path:
    """A file whose last modification and access were ``age_hours`` ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"Subject: half-written\r\n")
    stamp = time.time() - age_hours * HOUR
    os.utime(path, (stamp, stamp))
    return path


def make_maildir(root: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def test_only_files_older_than_36_hours_leave_tmp_at_start(qpconn_server, tmp_path):
    maildir = make_maildir(tmp_path / "store")
    old = make_file(maildir / "tmp" / "1700000000.M1P1Qold.host", 37)
    fresh = make_file(maildir / "tmp" / "1700000000.M2P1Qfresh.host", 35)
    new_old = make_file(maildir / "new" / "1700000000.M3P1Qnew.host", 100)
    cur_old = make_file(maildir / "cur" / "1700000000.M4P1Qcur.host:2,S", 100)
    old_dir = maildir / "tmp" / "a-directory"
    old_dir.mkdir()
    os.utime(old_dir, (time.time() - 100 * HOUR,) * 2)
    assert old.exists()

    qpconn_server(plugins=["rcpt_ok", f"queue/maildir {maildir}"])

    assert not old.exists()
    assert fresh.exists() and new_old.exists() and cur_old.exists() and old_dir.is_dir()


def test_a_file_read_recently_is_not_stale(qpconn_server, tmp_path):
    maildir = make_maildir(tmp_path / "store")
    read = make_file(maildir / "tmp" / "read-lately", 0)
    os.utime(read, (time.time() - HOUR, time.time() - 40 * HOUR))  # (atime, mtime)
    qpconn_server(plugins=["rcpt_ok", f"queue/maildir {maildir}"])
    assert read.exists()


def test_template_maildirs_are_cleaned_and_other_tmp_directories_left_alone(
    qpconn_server, tmp_path
):
    root = tmp_path / "mail"
    joe = make_maildir(root / "example.org" / "joe")
    stale = make_file(joe / "tmp" / "stale", 48)
    kept = make_file(joe / "tmp" / "kept", 1)
    # Matches the template's shape but is no Maildir (no new/, cur/): not ours to clean.
    foreign = make_file(root / "example.org" / "notes" / "tmp" / "old-but-foreign", 48)

    qpconn_server(plugins=["rcpt_ok", f"queue/maildir {root}/%d/%u"])

    assert not stale.exists()
    assert kept.exists() and foreign.exists()


@pytest_twisted.ensureDeferred
async def test_delivery_still_works_after_the_cleanup(qpconn_server, tmp_path):
    maildir = make_maildir(tmp_path / "store")
    make_file(maildir / "tmp" / "stale", 40)
    server = qpconn_server(plugins=["rcpt_ok", f"queue/maildir {maildir}"])

    def client() -> Any:
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            return smtp.sendmail("a@example.org", ["user@mx.test"], b"Subject: x\r\n\r\ny\r\n")

    assert await in_thread(client) == {}
    assert os.listdir(maildir / "tmp") == []
    assert len(os.listdir(maildir / "new")) == 1
