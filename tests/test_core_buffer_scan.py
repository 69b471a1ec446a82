"""The bulk scans of message text against plain line-by-line reference implementations.

DataReader never walks a body line by line (that is what makes large messages slow); these
properties check that its C-speed shortcuts (the long-line walk, the dot search, the
newline decoder used for bare CR/LF) give exactly what a simple per-line reading gives,
over random texts cut into random chunks.
"""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from qpconn.core import buffer
from qpconn.core.buffer import DataReader, has_long_line
from tests.support.fuzz import FUZZ_SETTINGS

CRLF = b"\r\n"

# Pieces texts are made of: runs long enough to cross any line limit tried, and every
# byte that matters to the framing (dots, bare CR and LF, CRLF).
_PIECE = st.one_of(
    st.integers(min_value=1, max_value=400).map(lambda n: b"x" * n),
    st.sampled_from([b".", b"\r", b"\n", CRLF, CRLF, CRLF + b".", b"a", b"\r\r", b"\n\r"]),
    st.binary(max_size=3),  # NUL, tabs, 8-bit bytes: the scans must not care
)
TEXT = st.lists(_PIECE, max_size=40).map(b"".join)
MAX_LINE = st.sampled_from([0, 1, 2, 3, 10, 64, 65, 66, 100, 129, 200, 1000])


def reference_lines(body: bytes) -> list[bytes]:
    """The CRLF-ended lines of ``body`` (which ends with CRLF), without their CRLF."""
    lines = []
    pos = 0
    while pos < len(body):
        end = body.find(CRLF, pos)
        lines.append(body[pos:end])
        pos = end + 2
    return lines


def reference_normalize(body: bytes) -> bytes:
    """Every bare CR and bare LF as CRLF, one byte at a time."""
    out = bytearray()
    index = 0
    while index < len(body):
        byte = body[index : index + 1]
        if body[index : index + 2] == CRLF:
            out += CRLF
            index += 2
            continue
        out += CRLF if byte in (b"\r", b"\n") else byte
        index += 1
    return bytes(out)


def reference_read(stream: bytes, max_line: int, normalize: bool) -> dict:
    """What reading the message text in ``stream`` must give, judged line by line."""
    if stream.startswith(b".\r\n"):
        body, rest = b"", stream[3:]
    else:
        end = stream.find(b"\r\n.\r\n")
        body, rest = stream[: end + 2], stream[end + 5 :]
    raw_lines = reference_lines(body)
    result = {
        "bare_lf": any(b"\n" in line for line in raw_lines),
        "bare_cr": any(b"\r" in line for line in raw_lines),
        "rest": rest,
    }
    if normalize and (result["bare_lf"] or result["bare_cr"]):
        body = reference_normalize(body)
    lines = reference_lines(body)
    result["long_line"] = bool(max_line) and any(len(line) + 2 > max_line for line in lines)
    result["text"] = b"".join((line[1:] if line[:1] == b"." else line) + CRLF for line in lines)
    return result


def read_in_chunks(reader: DataReader, stream: bytes, cuts: list[int]) -> tuple[bytes, bytes]:
    """Feed ``stream`` cut at ``cuts``, draining after each piece; return (text, rest)."""
    buf = bytearray()
    text = bytearray()
    bounds = [0, *sorted(cut % (len(stream) + 1) for cut in cuts), len(stream)]
    finished = False
    for start, stop in itertools.pairwise(bounds):
        buf += stream[start:stop]
        while not finished:
            before = len(buf)
            part, finished = reader.feed(buf)
            if part:
                text += part
            elif not finished and len(buf) == before:
                break
    assert finished
    return bytes(text), bytes(buf)


def check(stream: bytes, cuts: list[int], max_line: int, normalize: bool) -> None:
    expected = reference_read(stream, max_line, normalize)
    reader = DataReader(max_line=max_line, normalize=normalize)
    text, rest = read_in_chunks(reader, stream, cuts)
    assert (text, rest) == (expected["text"], expected["rest"])
    assert reader.size == len(expected["text"])
    assert (reader.bare_lf, reader.bare_cr) == (expected["bare_lf"], expected["bare_cr"])
    assert reader.long_line == expected["long_line"]


@FUZZ_SETTINGS
@given(TEXT, TEXT, st.lists(st.integers(min_value=0), max_size=8), MAX_LINE)
def test_reading_equals_a_line_by_line_reading(text, after, cuts, max_line):
    stream = text + b"\r\n.\r\n" + after
    check(stream, cuts, max_line, normalize=False)


# With normalize, bare CR and LF end lines in what is stored; raw lines are kept short
# enough that the reader never has to cut one (a cut is judged on the raw text).
_SHORT_PIECE = st.one_of(
    st.integers(min_value=1, max_value=30).map(lambda n: b"x" * n),
    st.sampled_from([b".", b"\r", b"\n", CRLF, CRLF + b".", b"\r.", b"\n.", b"\r\r", b"\n\r"]),
)


@FUZZ_SETTINGS
@given(
    st.lists(st.lists(_SHORT_PIECE, max_size=4).map(b"".join), max_size=12),
    st.lists(st.integers(min_value=0), max_size=8),
    st.sampled_from([0, 40, 1000]),
)
def test_normalized_reading_equals_a_line_by_line_reading(lines, cuts, max_line):
    text = b"".join(line + CRLF for line in lines if len(line) + 2 < (max_line or 1000))
    check(text + b".\r\nQUIT\r\n", cuts, max_line, normalize=True)


@FUZZ_SETTINGS
@given(TEXT, st.integers(min_value=1, max_value=300))
def test_long_line_walk_equals_the_split_rule(region, max_line):
    expected = max(map(len, region.split(CRLF))) + 2 > max_line
    assert has_long_line(region, max_line) == expected


@FUZZ_SETTINGS
@given(
    st.lists(
        st.one_of(
            st.integers(min_value=1, max_value=60).map(lambda n: b"y" * n),
            st.sampled_from([b".", CRLF, CRLF + b".", b"\r.", b"\n.", b"..", b"\r\n\r"]),
        ),
        max_size=20,
    ).map(b"".join),
    st.integers(min_value=1, max_value=40),
)
def test_dot_search_finds_the_first_dot_starting_a_line(data, stretch):
    # Small stretches put every boundary of the memchr/3-byte hand-over within reach.
    buf = bytearray(data)
    assert buffer._find_dot_line(buf, stretch) == buf.find(b"\r\n.")
    assert buffer._find_dot_line(buf) == buf.find(b"\r\n.")


@FUZZ_SETTINGS
@given(TEXT)
def test_bare_cr_and_lf_are_told_apart_like_a_byte_by_byte_reading(region):
    bare_lf = bare_cr = False
    for index, byte in enumerate(region):
        if byte == 0x0A and region[index - 1 : index] != b"\r":
            bare_lf = True
        if byte == 0x0D and region[index + 1 : index + 2] != b"\n":
            bare_cr = True
    reader = DataReader()
    assert reader._line_ends(region) == (bare_lf, bare_cr)
    assert reader._line_ends(b"ok\r\n") == (False, False)  # nothing carried over


def every_text(alphabet: bytes, longest: int):
    """Every text of up to ``longest`` bytes drawn from ``alphabet``."""
    for length in range(longest + 1):
        for combo in itertools.product(alphabet, repeat=length):
            yield bytes(combo)


def test_long_line_walk_equals_the_split_rule_on_every_short_text():
    # Exhaustive where hypothesis would only sample: every boundary of the walk's reach.
    for region in every_text(b"x\r\n", 8):
        longest_line = max(map(len, region.split(CRLF)))
        for longest in range(1, 7):
            assert buffer._reaches(region, longest) == (longest_line >= longest), (region, longest)


def test_dot_search_equals_a_plain_search_on_every_short_text():
    for data in every_text(b"y.\r\n", 7):
        buf = bytearray(data)
        expected = buf.find(b"\r\n.")
        for stretch in range(1, 6):
            assert buffer._find_dot_line(buf, stretch) == expected, (data, stretch)


def test_long_lines_are_found_exactly_at_the_limit_whatever_their_place():
    # The walk's reach ends exactly where a line becomes too long: check each side of
    # it, for lines at the start, in the middle and unended at the end of the text.
    for max_line in (65, 66, 100, 1000):
        for length in (max_line - 3, max_line - 2, max_line - 1):
            line = b"z" * length
            short = b"s\r\n" * 50
            for region in (line + CRLF + short, short + line + CRLF + short, short + line):
                expected = length + 2 > max_line
                assert has_long_line(region, max_line) == expected, (max_line, length)


def test_a_line_with_a_bare_lf_counts_whole_towards_the_limit():
    # Only CRLF ends a line: "a\nb" is one line of three octets (plus CRLF).
    assert has_long_line(b"x" * 40 + b"\n" + b"x" * 40 + CRLF, 80)
    assert not has_long_line(b"x" * 40 + CRLF + b"x" * 40 + CRLF, 80)
