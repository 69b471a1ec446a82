"""Issue 2, "Transaction": the body is kept in memory up to ``size_threshold`` and spooled
to a temporary file past it, and the file is gone once the transaction ends.

The end-to-end test watches a real session from a ``data_post`` plugin (where the whole
body is in), so it proves where the body was while the server held it, which the stored
message alone cannot tell.
"""

from __future__ import annotations

import os
import smtplib
from typing import Any

import pytest_twisted

from qpconn.mail.address import Address
from qpconn.mail.connection import Connection
from qpconn.mail.transaction import Transaction
from qpconn.plugins import Plugin
from tests.support.server import in_thread


class WhereIsTheBody(Plugin):
    """data_post: records where the body is and what it holds."""

    def register(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def hook_data_post(self, transaction: Any) -> None:
        path = transaction.spool_path
        self.seen.append(
            {
                "path": path,
                "exists": path is not None and os.path.exists(path),
                "body_size": transaction.body_size,
                "body": transaction.body_bytes(),
            }
        )


@pytest_twisted.ensureDeferred
async def test_small_body_stays_in_memory_and_large_one_is_spooled_then_removed(
    qpconn_server, tmp_path
):
    spool = tmp_path / "spool"
    spool.mkdir()
    watcher = WhereIsTheBody(None, "watcher")  # type: ignore[arg-type]
    server = qpconn_server(
        files={"size_threshold": "4096", "spool_dir": str(spool)},
        plugins=[watcher, "rcpt_ok", "queue/discard"],
    )
    small = b"x" * 100 + b"\r\n"
    large = b"".join(b"%06d the quick brown fox\r\n" % n for n in range(2000))

    def client() -> None:
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            for body in (small, large):
                smtp.sendmail("a@example.org", ["user@mx.test"], b"Subject: s\r\n\r\n" + body)

    await in_thread(client)
    await server.wait_sessions_closed()
    in_memory, spooled = watcher.seen
    assert in_memory["path"] is None and in_memory["body"] == small
    assert in_memory["body_size"] == len(small)
    assert spooled["exists"] and os.path.dirname(spooled["path"]) == str(spool)
    assert os.path.basename(spooled["path"]).endswith(".spool")
    assert spooled["body"] == large and spooled["body_size"] == len(large)
    # The transaction ended: its spool file went with it.
    assert not os.path.exists(spooled["path"])
    assert os.listdir(spool) == []


def test_threshold_is_the_largest_body_kept_in_memory(tmp_path):
    txn = Transaction(Connection(), id="t.1", size_threshold=10, spool_dir=str(tmp_path))
    txn.body_write(b"Subject: x\r\n\r\n")
    txn.body_write(b"0123456789")
    assert txn.spool_path is None and txn.body_bytes() == b"0123456789"
    txn.body_write(b"a")
    assert txn.spool_path is not None and os.path.exists(txn.spool_path)
    assert txn.body_bytes() == b"0123456789a"
    assert b"".join(txn.message_chunks()) == b"Subject: x\r\n\r\n0123456789a"
    path = txn.spool_path
    txn.close()
    txn.close()  # twice is harmless
    assert not os.path.exists(path)


def test_recipients_are_added_and_removed_by_address_with_domain_case_ignored():
    txn = Transaction(Connection(), id="t.2")
    first = txn.add_recipient(Address.parse("<Joe@Example.COM>"), {"NOTIFY": "NEVER"})
    txn.add_recipient(Address.parse("<ann@example.com>"))
    assert first.params == {"NOTIFY": "NEVER"}
    txn.remove_recipient(Address.parse("<Joe@example.com>"))
    assert [r.address for r in txn.recipients] == ["ann@example.com"]
    # The local part keeps its case: joe is another mailbox than Joe.
    txn.add_recipient(Address.parse("<Joe@example.com>"))
    txn.remove_recipient(Address.parse("<joe@example.com>"))
    assert len(txn.recipients) == 2
    txn.notes("seen", 1)
    assert txn.notes["seen"] == 1 and txn.notes("seen") == 1
