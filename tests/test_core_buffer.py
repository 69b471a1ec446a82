"""Framing of command lines and message text, on buffers directly."""

from __future__ import annotations

import pytest

from qpconn.core.buffer import LINE_INCOMPLETE, DataReader, take_line


def read_all(reader, chunks):
    """Feed ``chunks`` one by one, draining after each; return (text, finished, rest)."""
    buf = bytearray()
    text = bytearray()
    finished = False
    for chunk in chunks:
        buf += chunk
        while not finished:
            part, finished = reader.feed(buf)
            if part:
                text += part
            elif not finished:
                break
    return bytes(text), finished, bytes(buf)


def test_take_line_removes_one_line_with_its_lf():
    buf = bytearray(b"HELO a\r\nNOOP\r\nQU")
    assert take_line(buf) == b"HELO a\r\n"
    assert take_line(buf) == b"NOOP\r\n"
    assert take_line(buf) is LINE_INCOMPLETE
    assert buf == b"QU"


def test_take_line_returns_bare_lf_lines_for_the_session_to_judge():
    buf = bytearray(b"a\nb\r\n")
    assert take_line(buf) == b"a\n"
    assert take_line(buf) == b"b\r\n"


def test_reader_stops_at_the_end_marker_and_leaves_the_rest():
    text, finished, rest = read_all(DataReader(), [b"a\r\nb\r\n.\r\nQUIT\r\n"])
    assert (text, finished, rest) == (b"a\r\nb\r\n", True, b"QUIT\r\n")


def test_reader_sees_an_empty_message():
    reader = DataReader()
    text, finished, rest = read_all(reader, [b".\r\nNOOP\r\n"])
    assert (text, finished, rest, reader.size) == (b"", True, b"NOOP\r\n", 0)


def test_reader_passes_on_complete_lines_only():
    reader = DataReader()
    buf = bytearray(b"one\r\ntw")
    assert reader.feed(buf) == (b"one\r\n", False)
    assert buf == b"tw"
    assert reader.feed(buf) == (None, False)


def test_reader_unstuffs_dots_across_feeds():
    reader = DataReader()
    text, finished, _ = read_all(reader, [b"..a\r\n", b"..b\r\n.", b"..c\r\n.", b"\r", b"\n"])
    assert finished
    assert text == b".a\r\n.b\r\n..c\r\n"
    assert reader.size == len(text)


def test_a_lone_dot_line_ends_the_message_but_dot_dot_does_not():
    text, finished, _ = read_all(DataReader(), [b"..\r\n.\r\n"])
    assert (text, finished) == (b".\r\n", True)


@pytest.mark.parametrize(
    ("stream", "bare_lf", "bare_cr"),
    [
        (b"a\n.\nb\r\n.\r\n", True, False),
        (b"a\r.\rb\r\n.\r\n", False, True),
        (b"a\rb\nc\r\n.\r\n", True, True),
        (b"\n.\r\n.\r\n", True, False),
        (b"a\r\n.\r\r\n.\r\n", False, True),
    ],
)
def test_bare_cr_and_lf_are_flagged_and_never_end_the_text(stream, bare_lf, bare_cr):
    reader = DataReader()
    text, finished, rest = read_all(reader, [stream])
    assert finished and rest == b""
    assert (reader.bare_lf, reader.bare_cr) == (bare_lf, bare_cr)
    assert reader.size == len(text)


def test_size_counts_unstuffed_text_and_stops_passing_it_past_the_limit():
    reader = DataReader(max_size=10)
    text, finished, _ = read_all(reader, [b"..12345\r\n", b"67890\r\n", b"x\r\n.\r\n"])
    assert finished
    assert reader.oversized
    assert reader.size == 8 + 7 + 3
    assert text == b".12345\r\n"


def test_long_line_limit_counts_the_crlf():
    reader = DataReader(max_line=10)
    read_all(reader, [b"x" * 8 + b"\r\n.\r\n"])
    assert not reader.long_line
    reader = DataReader(max_line=10)
    read_all(reader, [b"x" * 9 + b"\r\n.\r\n"])
    assert reader.long_line


def test_an_endless_line_is_cut_keeping_only_what_may_start_the_end_marker():
    reader = DataReader(max_line=1000)
    buf = bytearray(b".leading dot" + b"x" * 5000)
    text, finished = reader.feed(buf)
    assert not finished
    assert len(buf) == 4
    assert text == b"leading dot" + b"x" * (5000 - 4)
    assert reader.long_line
    assert reader.size == len(text)
    buf += b"\r\n.\r\n"
    assert reader.feed(buf) == (b"xxxx\r\n", True)


def test_a_cut_does_not_unstuff_the_middle_of_a_line():
    reader = DataReader(max_line=10)
    text, finished, _ = read_all(reader, [b"a" * 20, b".b\r\n.\r\n"])
    assert finished
    assert text == b"a" * 20 + b".b\r\n"


def test_an_end_marker_straddling_a_cut_is_still_found():
    for tail in (b"\r", b"\r\n", b"\r\n.", b"\r\n.\r"):
        reader = DataReader(max_line=100)
        text, finished, rest = read_all(reader, [b"z" * 500 + tail, b"\r\n.\r\n"[len(tail) :]])
        assert finished and rest == b"", tail
        assert text == b"z" * 500 + b"\r\n"


def test_a_bare_cr_at_a_cut_is_flagged():
    reader = DataReader(max_line=10)
    read_all(reader, [b"a" * 20 + b"\r" + b"b" * 20, b"\r\n.\r\n"])
    assert reader.bare_cr
    assert not reader.bare_lf
