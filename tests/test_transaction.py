"""Transaction.body_write: the header is found the same whatever pieces the text comes in.

The first piece of a large message holds the header and the start of the body; it is
parsed in place rather than copied into the header buffer, while a header that arrives
line by line is gathered. Both ways must give the same header and body.
"""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from qpconn.mail.header import Header, is_field_line, split_header
from qpconn.mail.transaction import MAX_HEADER_BYTES, Transaction
from tests.support.fuzz import FUZZ_SETTINGS

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
