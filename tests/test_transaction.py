"""Transaction: where the body is kept, how its header is found, its recipients and notes.

The body is kept in memory up to ``size_threshold`` and spooled to a temporary file past
it, and the file is gone once the transaction ends. The end-to-end test watches a real
session from a ``data_post`` plugin (where the whole body is in), so it proves where the
body was while the server held it, which the stored message alone cannot tell.

Transaction.body_write finds the header the same whatever pieces the text comes in: the
first piece of a large message holds the header and the start of the body; it is parsed in
place rather than copied into the header buffer, while a header that arrives line by line
is gathered. Both ways must give the same header and body; and a Header split only when
looked at behaves as one split at once.

Recipients are added and removed by address, the domain's case ignored, the local part's
kept.
"""

from __future__ import annotations

import itertools
import os
import smtplib
from typing import Any

import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st

from qpconn.mail.address import Address
from qpconn.mail.connection import Connection
from qpconn.mail.header import Header, is_field_line, split_header
from qpconn.mail.transaction import MAX_HEADER_BYTES, Recipient, Transaction
from qpconn.plugins import Plugin
from tests.support.fuzz import FUZZ_SETTINGS
from tests.support.server import in_thread


# -- the body: in memory, then spooled ----------------------------------------------------------
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


# -- recipients and notes ----------------------------------------------------------------------

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


# -- the header, whatever pieces the text comes in --------------------------------------------
_LINE = st.sampled_from(
    [b"Subject: hi\r\n", b"From: <a@b>\r\n", b" folded\r\n", b"\r\n", b"body line\r\n",
     b"X-Y: z\r\n", b"\tfold\r\n", b"no colon here\r\n", b"", b"partial"]
)


def write_all(pieces: list[bytes]) -> tuple[Transaction, int]:
    """A transaction fed ``pieces`` then ended; also how often the header became complete."""
    txn = Transaction(size_threshold=1 << 20)
    completed = sum(1 for piece in pieces if txn.body_write(piece))
    completed += txn.end_of_data()
    return txn, completed


def expected_parts(text: bytes) -> tuple[bytes, bytes]:
    parts = split_header(text)
    if isinstance(parts, int):  # never ended: header if it starts like one
        return (text, b"") if is_field_line(text) else (b"", text)
    return parts


@FUZZ_SETTINGS
@given(st.lists(_LINE, max_size=20), st.lists(st.integers(min_value=0), max_size=6))
def test_header_and_body_do_not_depend_on_the_pieces(lines, cuts):
    text = b"".join(lines)
    bounds = [0, *sorted(cut % (len(text) + 1) for cut in cuts), len(text)]
    pieces = [text[start:stop] for start, stop in itertools.pairwise(bounds)]
    whole, whole_done = write_all([text])
    split, split_done = write_all(pieces)
    assert whole_done == split_done == 1
    assert whole.data_size == split.data_size == len(text)
    head, body = expected_parts(text)
    for txn in (whole, split):
        assert txn.header is not None
        assert txn.header.as_bytes() == head
        assert txn.body_bytes() == body
        txn.close()


def test_a_header_that_never_ends_is_cut_at_the_limit_whether_in_one_piece_or_many():
    text = b"X-Long: " + b"a" * (MAX_HEADER_BYTES + 10)
    for pieces in ([text], [text[:1000], text[1000:]], [text[:10], text[10:MAX_HEADER_BYTES]]):
        txn = Transaction()
        done = [txn.body_write(piece) for piece in pieces]
        # Complete once the unended header passed the limit, and not before.
        assert done[-1] == (sum(map(len, pieces)) > MAX_HEADER_BYTES)
        assert not any(done[:-1])
        txn.end_of_data()
        assert txn.header is not None
        assert txn.header.as_bytes() == b"".join(pieces)
        assert txn.body_bytes() == b""
        txn.close()


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["top", "append", "second", "delete", "prefix", "get", "bytes"]),
        st.sampled_from(["Subject", "Received", "X-Y", "From"]),
    ),
    max_size=8,
)


def _apply(header: Header, op: str, name: str) -> object:
    if op == "top":
        header.add(name, "added on top", index=0)
    elif op == "append":
        header.add(name, "added last")
    elif op == "second":
        header.add(name, "added second", index=1)
    elif op == "delete":
        return header.delete(name)
    elif op == "prefix":
        return header.prefix(name, "[tag]")
    elif op == "get":
        return header.get_all(name), header.count(name), header.names(), len(header)
    return header.as_bytes()


@FUZZ_SETTINGS
@given(st.lists(_LINE, max_size=12), _OPS)
def test_a_header_split_only_when_looked_at_behaves_as_one_split_at_once(lines, ops):
    """Header splits its fields on first need (adding on top and writing it back need
    none): every sequence of operations must see what an at-once split would give."""
    raw = b"".join(line for line in lines if line != b"\r\n")
    lazy, eager = Header(raw), Header(raw)
    eager.names()  # split now
    for op, name in ops:
        assert _apply(lazy, op, name) == _apply(eager, op, name)
        assert lazy.as_bytes() == eager.as_bytes()
    assert Header(raw).as_bytes() == raw  # untouched: the bytes as they came


def test_a_fresh_transaction_makes_its_containers_only_when_used():
    """The transaction every session starts with costs no empty containers (issue 20)."""
    txn = Transaction(Connection(), id="x.1")
    assert txn.untouched  # asking does not make them
    made = [name for name in ("_mail_params", "_recipients", "_notes", "_head", "_memory")
            if getattr(txn, name) is not None]  # fmt: skip
    assert made == []
    txn.recipients.append(Recipient("u", "example.org"))
    assert txn.recipients == [Recipient("u", "example.org")] and not txn.untouched
    txn.notes["k"] = 1
    assert txn.notes("k") == 1 and type(txn.notes).__name__ == "Notes"
    assert txn.mail_params == {} and txn.dsn.ret is None
    txn.recipients = []  # plugins may replace them (remove_recipient does)
    assert txn.recipients == [] and txn.untouched is False  # the notes were used
    txn.body_write(b"Subject: x\r\n\r\nbody\r\n")
    assert txn.body_bytes() == b"body\r\n"
    txn.close()
    assert txn.body_bytes() == b""
