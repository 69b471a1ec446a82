"""queue/discard end to end: the client gets a real 250, and nothing is stored.

The plugin is listed before ``queue/maildir``: if it did not answer the ``queue`` hook,
the Maildir plugin after it would store the message, so an empty Maildir shows that the
discard plugin both answered and kept nothing.
"""

from __future__ import annotations

import os
import re
import smtplib

import pytest_twisted

from tests.support.server import in_thread


def send_two(address: tuple[str, int]) -> list[tuple[int, bytes]]:
    """Two messages on one session; the reply to each DATA."""
    replies = []
    with smtplib.SMTP(*address, timeout=5) as smtp:
        smtp.ehlo("client.test")
        for number in (1, 2):
            smtp.mail("sender@example.org")
            smtp.rcpt("user@mx.test")
            replies.append(smtp.data(f"Subject: {number}\r\n\r\nbody {number}\r\n".encode()))
    return replies


@pytest_twisted.ensureDeferred
async def test_discard_accepts_each_message_with_its_id_and_stores_nothing(
    qpconn_server, tmp_path
):
    maildir = tmp_path / "kept"
    server = qpconn_server(plugins=["rcpt_ok", "queue/discard", f"queue/maildir {maildir}"])

    replies = await in_thread(send_two, server.address)

    ids = []
    for code, text in replies:
        assert code == 250
        match = re.fullmatch(rb"2\.0\.0 Queued as (\S+) \(discarded\)", text)
        assert match, text
        ids.append(match.group(1))
    assert ids[0] != ids[1]
    folders = [maildir / sub for sub in ("new", "tmp")]
    stored = [name for folder in folders if folder.is_dir() for name in os.listdir(folder)]
    assert stored == []


@pytest_twisted.ensureDeferred
async def test_without_discard_the_next_queue_plugin_stores_the_message(qpconn_server, tmp_path):
    """The control for the test above: the same setup minus discard does store."""
    maildir = tmp_path / "kept"
    server = qpconn_server(plugins=["rcpt_ok", f"queue/maildir {maildir}"])

    replies = await in_thread(send_two, server.address)

    assert [code for code, _ in replies] == [250, 250]
    assert len(os.listdir(maildir / "new")) == 2
