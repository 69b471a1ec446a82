"""The sans-I/O PROXY protocol parser (qpconn.core.proxy), driven with bytes only.

Pins v1 and v2 headers accepted and refused (each refusal as early as the bytes allow),
the bounded buffers, the bytes after the header handed back intact, and, as properties,
round trips and "split anywhere gives the same outcome as whole". The server with
hand-made headers is tests/test_proxy_e2e.py; behind a real HAProxy,
tests/test_proxy_haproxy.py.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpconn.core.proxy import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeaderParser,
    ProxyInfo,
    ProxyProtocolError,
)

SMTP = b"EHLO x\r\n"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# -- helpers -----------------------------------------------------------------


def v2_header(
    family: int = 0x11,
    payload: bytes = b"",
    *,
    command: int = 1,
    version: int = 2,
    length: int | None = None,
) -> bytes:
    """Build a v2 header; ``length`` overrides the length field for bad cases."""
    declared = len(payload) if length is None else length
    return (
        V2_SIGNATURE
        + bytes([(version << 4) | command, family])
        + struct.pack("!H", declared)
        + payload
    )


def ipv4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    """Address block for family 0x11."""
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def ipv6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    """Address block for family 0x21."""
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    """One TLV: type, 16-bit length, value."""
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def parse(data: bytes, **kwargs: int) -> tuple[ProxyInfo, bytes] | None:
    """Feed everything at once."""
    return ProxyHeaderParser(**kwargs).feed(data)


def parse_bytewise(data: bytes) -> tuple[ProxyInfo, bytes] | None:
    """Feed one byte at a time; bytes after completion go to the remainder."""
    parser = ProxyHeaderParser()
    for index in range(len(data)):
        result = parser.feed(data[index : index + 1])
        if result is not None:
            info, remainder = result
            return info, remainder + data[index + 1 :]
    return None


def error_offset(data: bytes) -> int | None:
    """Index of the byte whose arrival makes the parser raise, if any."""
    parser = ProxyHeaderParser()
    for index in range(len(data)):
        try:
            if parser.feed(data[index : index + 1]) is not None:
                return None
        except ProxyProtocolError:
            return index
    return None


def assert_rejected(data: bytes) -> None:
    """Malformed input is refused whether fed whole or byte by byte."""
    with pytest.raises(ProxyProtocolError):
        parse(data)
    with pytest.raises(ProxyProtocolError):
        parse_bytewise(data)


V4_INFO = ProxyInfo("PROXY", 1, ("192.0.2.1", 56324), ("198.51.100.7", 25))
V4_LINE = b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 25\r\n"

# -- version 1: valid ----------------------------------------------------------


def test_v1_tcp4() -> None:
    assert parse(V4_LINE) == (V4_INFO, b"")


def test_v1_tcp6() -> None:
    line = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 587\r\n"
    info = ProxyInfo("PROXY", 1, ("2001:db8::1", 1), ("2001:db8::2", 587))
    assert parse(line) == (info, b"")


def test_v1_tcp6_addresses_are_canonicalised() -> None:
    """Callers compare addresses as text, so one address has one spelling."""
    line = b"PROXY TCP6 2001:DB8:0:0::1 0:0:0:0:0:0:0:1 0 25\r\n"
    result = parse(line)
    assert result is not None
    assert result[0].source == ("2001:db8::1", 0)
    assert result[0].destination == ("::1", 25)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN 192.0.2.1 198.51.100.7 1 2\r\n",
        b"PROXY UNKNOWN whatever \xff junk\r\n",
        b"PROXY UNKNOWN \r\n",
    ],
)
def test_v1_unknown(line: bytes) -> None:
    assert parse(line) == (ProxyInfo("UNKNOWN", 1, None, None), b"")


def test_v1_port_bounds_accepted() -> None:
    result = parse(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n")
    assert result is not None
    assert result[0].source == ("0.0.0.0", 0)
    assert result[0].destination == ("255.255.255.255", 65535)


def test_v1_longest_allowed_line() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - len(b"PROXY UNKNOWN \r\n"))
    line += b"\r\n"
    assert len(line) == V1_MAX_LENGTH
    assert parse(line) == (ProxyInfo("UNKNOWN", 1, None, None), b"")


# -- version 1: malformed --------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 65536 25\r\n", id="port-65536"),
        pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 25 99999\r\n", id="port-99999"),
        pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 +25 25\r\n", id="port-plus"),
        pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 -1 25\r\n", id="port-minus"),
        pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 025 25\r\n", id="port-zero"),
        pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 00 25\r\n", id="port-00"),
        pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 0x19 25\r\n", id="port-hex"),
        pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 100000 1\r\n", id="port-6dig"),
        pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7  25\r\n", id="port-empty"),
    ],
)
def test_v1_bad_port(line: bytes) -> None:
    assert_rejected(line)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"PROXY TCP4 2001:db8::1 198.51.100.7 1 2\r\n", id="tcp4-v6-src"),
        pytest.param(b"PROXY TCP4 192.0.2.1 ::1 1 2\r\n", id="tcp4-v6-dst"),
        pytest.param(b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", id="tcp6-v4-src"),
        pytest.param(b"PROXY TCP6 2001:db8::1 198.51.100.7 1 2\r\n", id="tcp6-v4-dst"),
        pytest.param(b"PROXY TCP4 192.0.2.256 198.51.100.7 1 2\r\n", id="v4-octet"),
        pytest.param(b"PROXY TCP4 192.0.2.01 198.51.100.7 1 2\r\n", id="v4-lead-0"),
        pytest.param(b"PROXY TCP4 192.0.2 198.51.100.7 1 2\r\n", id="v4-short"),
        pytest.param(b"PROXY TCP6 2001:db8:::1 ::2 1 2\r\n", id="v6-triple"),
        pytest.param(b"PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n", id="v6-scope"),
    ],
)
def test_v1_bad_address(line: bytes) -> None:
    assert_rejected(line)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"PROXY  TCP4 192.0.2.1 198.51.100.7 1 2\r\n", id="double-1"),
        pytest.param(b"PROXY TCP4  192.0.2.1 198.51.100.7 1 2\r\n", id="double-2"),
        pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 \r\n", id="trailing"),
        pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 1\r\n", id="too-few"),
        pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 3\r\n", id="too-many"),
        pytest.param(b"PROXY TCP4\r\n", id="no-fields"),
        pytest.param(b"PROXY TCP5 192.0.2.1 198.51.100.7 1 2\r\n", id="tcp5"),
        pytest.param(b"PROXY UDP4 192.0.2.1 198.51.100.7 1 2\r\n", id="udp4"),
        pytest.param(b"PROXY tcp4 192.0.2.1 198.51.100.7 1 2\r\n", id="lowercase"),
        pytest.param(b"PROXY UNKNOWNX\r\n", id="unknown-glued"),
        pytest.param(b"PROXY \r\n", id="empty"),
        pytest.param(b"proxy TCP4 192.0.2.1 198.51.100.7 1 2\r\n", id="lower-proxy"),
        pytest.param(b"PROXY\tTCP4 192.0.2.1 198.51.100.7 1 2\r\n", id="tab"),
        pytest.param(b"PROXY TCP4 192.0.2.1\t198.51.100.7 1 2\r\n", id="tab-2"),
    ],
)
def test_v1_bad_syntax(line: bytes) -> None:
    assert_rejected(line)


def test_v1_bare_lf() -> None:
    assert_rejected(b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\n")
    assert_rejected(b"PROXY UNKNOWN\n" + SMTP)


def test_v1_cr_without_lf() -> None:
    assert_rejected(b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\rEHLO x\r\n")
    assert_rejected(b"PROXY UNKNOWN foo\rbar\r\n")


def test_v1_bare_lf_detected_without_waiting() -> None:
    line = b"PROXY UNKNOWN\n"
    assert error_offset(line + SMTP) == len(line) - 1


def test_v1_over_long_line() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - len(b"PROXY UNKNOWN \r\n") + 1)
    line += b"\r\n"
    assert len(line) == V1_MAX_LENGTH + 1
    assert_rejected(line)
    # The error fires once the 107th byte arrives without a line end: the
    # parser must not keep reading a line that can no longer be valid.
    assert error_offset(line) == V1_MAX_LENGTH - 1


def test_v1_over_long_line_ending_in_cr() -> None:
    """A CR as the 107th byte would need a 108th byte (the LF): too long."""
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - len(b"PROXY UNKNOWN ") - 1)
    line += b"\r\n"
    assert len(line) == V1_MAX_LENGTH + 1
    assert_rejected(line)


def test_v1_endless_line_fails_in_one_feed() -> None:
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError):
        parser.feed(b"PROXY UNKNOWN " + b"x" * 1_000_000)


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"PRXY", 2),
        (b"PROXY-", 5),
        (b"PROXY TCP5", 9),
        (b"PROXY UNKNOWNX", 13),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 x", 36),
        (b"PROXY TCP6 fe80::1%", 18),
    ],
)
def test_v1_early_rejection(data: bytes, offset: int) -> None:
    """Garbage is refused on the first byte that rules out a valid line."""
    assert error_offset(data) == offset


# -- not a PROXY header at all ---------------------------------------------------


@pytest.mark.parametrize("data", [SMTP, b"GET / HTTP/1.0\r\n", b"\x00", b" PROXY"])
def test_not_a_header_rejected_on_first_byte(data: bytes) -> None:
    assert error_offset(data) == 0
    with pytest.raises(ProxyProtocolError):
        parse(data)


def test_empty_feed_needs_more() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"") is None
    assert parser.feed(V4_LINE[:5]) is None
    assert parser.feed(b"") is None
    assert parser.feed(V4_LINE[5:]) == (V4_INFO, b"")


# -- version 2: valid ------------------------------------------------------------


def test_v2_ipv4() -> None:
    header = v2_header(0x11, ipv4_block("192.0.2.1", "198.51.100.7", 56324, 25))
    info = ProxyInfo("PROXY", 2, ("192.0.2.1", 56324), ("198.51.100.7", 25))
    assert parse(header) == (info, b"")


def test_v2_ipv6() -> None:
    header = v2_header(0x21, ipv6_block("2001:db8::1", "2001:db8::2", 1, 65535))
    info = ProxyInfo("PROXY", 2, ("2001:db8::1", 1), ("2001:db8::2", 65535))
    assert parse(header) == (info, b"")


def test_v2_ipv4_with_tlvs() -> None:
    tlvs = tlv(0x01, b"smtp") + tlv(0x04, b"") + tlv(0x20, b"\x01" + b"\x00" * 4)
    header = v2_header(0x11, ipv4_block("10.0.0.1", "10.0.0.2", 1000, 25) + tlvs)
    info = ProxyInfo("PROXY", 2, ("10.0.0.1", 1000), ("10.0.0.2", 25))
    assert parse(header + SMTP) == (info, SMTP)
    assert parse_bytewise(header + SMTP) == (info, SMTP)


def test_v2_ipv6_with_tlvs() -> None:
    tlvs = tlv(0x02, b"mx.example.org") + tlv(0xEE, b"\xff" * 300)
    header = v2_header(0x21, ipv6_block("::1", "::2", 1, 2) + tlvs)
    assert parse(header) == (ProxyInfo("PROXY", 2, ("::1", 1), ("::2", 2)), b"")


def test_v2_local() -> None:
    assert parse(v2_header(0x00, command=0) + SMTP) == (
        ProxyInfo("LOCAL", 2, None, None),
        SMTP,
    )


@pytest.mark.parametrize("family", [0x00, 0x11, 0x12, 0x22, 0x32, 0xFF])
def test_v2_local_ignores_family_and_payload(family: int) -> None:
    """LOCAL means "use the real endpoints": whatever follows is discarded."""
    header = v2_header(family, b"\x01\x02\x03", command=0)
    assert parse(header + SMTP) == (ProxyInfo("LOCAL", 2, None, None), SMTP)


def test_v2_unspec() -> None:
    assert parse(v2_header(0x00)) == (ProxyInfo("PROXY", 2, None, None), b"")


def test_v2_unspec_with_tlvs() -> None:
    header = v2_header(0x00, tlv(0x05, b"id"))
    assert parse(header) == (ProxyInfo("PROXY", 2, None, None), b"")


def test_v2_unix_stream() -> None:
    header = v2_header(0x31, b"/a".ljust(108, b"\x00") + b"/b".ljust(108, b"\x00"))
    assert parse(header + SMTP) == (ProxyInfo("PROXY", 2, None, None), SMTP)


def test_v2_larger_limit() -> None:
    payload = ipv4_block("192.0.2.1", "192.0.2.2", 1, 2) + tlv(0xE0, b"x" * 5000)
    header = v2_header(0x11, payload)
    with pytest.raises(ProxyProtocolError):
        parse(header)
    result = parse(header, max_v2_length=len(payload))
    assert result is not None
    assert result[0].source == ("192.0.2.1", 1)


def test_v2_exact_limit_accepted() -> None:
    payload = ipv4_block("192.0.2.1", "192.0.2.2", 1, 2)
    assert parse(v2_header(0x11, payload), max_v2_length=12) is not None
    with pytest.raises(ProxyProtocolError):
        parse(v2_header(0x11, payload), max_v2_length=11)


@pytest.mark.parametrize("limit", [-1, 65536])
def test_bad_limit(limit: int) -> None:
    with pytest.raises(ValueError, match="max_v2_length"):
        ProxyHeaderParser(max_v2_length=limit)


# -- version 2: malformed ----------------------------------------------------------


@pytest.mark.parametrize("index", range(len(V2_SIGNATURE)))
def test_v2_bad_signature(index: int) -> None:
    header = bytearray(v2_header(0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2)))
    header[index] ^= 0x80
    assert_rejected(bytes(header))
    assert error_offset(bytes(header)) == index


@pytest.mark.parametrize("version", [0, 1, 3, 15])
def test_v2_bad_version(version: int) -> None:
    header = v2_header(0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2), version=version)
    assert_rejected(header)
    assert error_offset(header) == 12


@pytest.mark.parametrize("command", [2, 3, 15])
def test_v2_bad_command(command: int) -> None:
    header = v2_header(0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2), command=command)
    assert_rejected(header)
    assert error_offset(header) == 12


@pytest.mark.parametrize("family", [0x12, 0x22, 0x32, 0x01, 0x10, 0x13, 0x41, 0xFF])
def test_v2_bad_family(family: int) -> None:
    header = v2_header(family, b"\x00" * 216)
    assert_rejected(header)
    assert error_offset(header) == 13


@pytest.mark.parametrize(
    ("family", "size"), [(0x11, 12), (0x21, 36), (0x31, 216)]
)
def test_v2_length_below_address_block(family: int, size: int) -> None:
    header = v2_header(family, b"\x00" * (size - 1))
    assert_rejected(header)
    # Detected from the length field alone, before any payload byte.
    assert error_offset(header) == 15


def test_v2_length_above_limit_rejected_from_length_field() -> None:
    header = v2_header(0x11, length=4097)
    assert error_offset(header + b"\x00" * 4097) == 15


def test_v2_truncated_header_waits() -> None:
    """A declared length longer than the data so far is not an error yet."""
    header = v2_header(0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2) + tlv(1, b"h2"))
    for cut in (1, 12, 13, 14, 15, 16, 20, len(header) - 1):
        parser = ProxyHeaderParser()
        assert parser.feed(header[:cut]) is None
        result = parser.feed(header[cut:] + SMTP)
        assert result is not None
        assert result[1] == SMTP


@pytest.mark.parametrize(
    "tlvs",
    [
        pytest.param(b"\x01", id="type-only"),
        pytest.param(b"\x01\x00", id="half-length"),
        pytest.param(b"\x01\x00\x05abcd", id="short-value"),
        pytest.param(tlv(1, b"ok") + b"\x02\x00\x03ab", id="second-short"),
        pytest.param(tlv(1, b"ok") + b"\x02", id="second-type-only"),
    ],
)
def test_v2_truncated_tlv(tlvs: bytes) -> None:
    header = v2_header(0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2) + tlvs)
    # Even with more bytes following, the TLV must fit in the declared length.
    assert_rejected(header + SMTP)
    assert_rejected(v2_header(0x00, tlvs))


def test_v2_buffer_is_bounded() -> None:
    """However much arrives at once, only the header itself is buffered."""
    payload = ipv4_block("192.0.2.1", "192.0.2.2", 1, 2) + tlv(0xE0, b"x" * 4081)
    header = v2_header(0x11, payload)
    assert len(payload) == 4096
    parser = ProxyHeaderParser()
    assert parser.feed(header[:20]) is None
    assert len(parser._buf) == 20
    tail = b"y" * 1_000_000
    result = parser.feed(header[20:] + tail)
    assert result is not None
    assert result[1] == tail
    assert len(parser._buf) == 0


def test_v1_buffer_is_bounded() -> None:
    parser = ProxyHeaderParser()
    result = parser.feed(V4_LINE + b"z" * 1_000_000)
    assert result is not None
    assert result[1] == b"z" * 1_000_000
    assert len(parser._buf) == 0
    parser = ProxyHeaderParser()
    assert parser.feed(V4_LINE[:-1]) is None
    assert len(parser._buf) <= V1_MAX_LENGTH


# -- remainder and parser life cycle -------------------------------------------------


V2_IPV4 = v2_header(0x11, ipv4_block("192.0.2.1", "198.51.100.7", 56324, 25))
ALL_VALID = [
    V4_LINE,
    b"PROXY TCP6 2001:db8::1 2001:db8::2 1 587\r\n",
    b"PROXY UNKNOWN\r\n",
    V2_IPV4,
    v2_header(0x21, ipv6_block("::1", "::2", 1, 2) + tlv(3, b"\x00\x00\x00\x00")),
    v2_header(0x00, command=0),
    v2_header(0x00),
]


@pytest.mark.parametrize("header", ALL_VALID)
def test_remainder_preserved(header: bytes) -> None:
    tail = SMTP + b"MAIL FROM:<a@b>\r\n" + bytes(range(256))
    whole = parse(header + tail)
    assert whole is not None
    assert whole[1] == tail
    assert parse_bytewise(header + tail) == whole
    # Split inside the header, then header tail + session start in one chunk.
    parser = ProxyHeaderParser()
    assert parser.feed(header[:-3]) is None
    assert parser.feed(header[-3:] + tail) == whole


@pytest.mark.parametrize("header", ALL_VALID)
def test_header_alone_gives_empty_remainder(header: bytes) -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(header[:-1]) is None
    result = parser.feed(header[-1:])
    assert result is not None
    assert result[1] == b""


def test_errors_are_sticky() -> None:
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError):
        parser.feed(b"PROXY TCP9")
    with pytest.raises(ProxyProtocolError):
        parser.feed(b" 192.0.2.1 198.51.100.7 1 2\r\n")


def test_feed_after_completion_is_a_programming_error() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(V4_LINE) is not None
    with pytest.raises(RuntimeError):
        parser.feed(SMTP)


def test_error_is_a_value_error() -> None:
    assert issubclass(ProxyProtocolError, ValueError)


# -- property-based ------------------------------------------------------------------


ports = st.integers(min_value=0, max_value=65535)


@given(st.ip_addresses(v=4), st.ip_addresses(v=4), ports, ports, st.binary())
def test_v1_tcp4_roundtrip(
    src: ipaddress.IPv4Address,
    dst: ipaddress.IPv4Address,
    sport: int,
    dport: int,
    tail: bytes,
) -> None:
    line = f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()
    info = ProxyInfo("PROXY", 1, (str(src), sport), (str(dst), dport))
    assert parse(line + tail) == (info, tail)


@given(st.ip_addresses(v=6), st.ip_addresses(v=6), ports, ports, st.binary())
def test_v1_tcp6_roundtrip(
    src: ipaddress.IPv6Address,
    dst: ipaddress.IPv6Address,
    sport: int,
    dport: int,
    tail: bytes,
) -> None:
    line = f"PROXY TCP6 {src.exploded} {dst} {sport} {dport}\r\n".encode()
    assert len(line) <= V1_MAX_LENGTH
    info = ProxyInfo("PROXY", 1, (str(src), sport), (str(dst), dport))
    assert parse(line + tail) == (info, tail)


@given(
    st.one_of(
        st.tuples(st.just(0x11), st.ip_addresses(v=4), st.ip_addresses(v=4)),
        st.tuples(st.just(0x21), st.ip_addresses(v=6), st.ip_addresses(v=6)),
    ),
    ports,
    ports,
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4),
    st.binary(),
)
def test_v2_roundtrip(
    addresses: tuple[int, IPAddress, IPAddress],
    sport: int,
    dport: int,
    tlvs: list[tuple[int, bytes]],
    tail: bytes,
) -> None:
    family, src, dst = addresses
    payload = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    payload += b"".join(tlv(kind, value) for kind, value in tlvs)
    info = ProxyInfo("PROXY", 2, (str(src), sport), (str(dst), dport))
    assert parse(v2_header(family, payload) + tail) == (info, tail)


def _mutate(data: bytes, position: int, value: int) -> bytes:
    """Overwrite one byte (position taken modulo the length)."""
    if not data:
        return data
    index = position % len(data)
    return data[:index] + bytes([value]) + data[index + 1 :]


_valid_streams = st.tuples(st.sampled_from(ALL_VALID), st.binary(max_size=30)).map(
    lambda pair: pair[0] + pair[1]
)
_mutated_streams = st.builds(
    _mutate, _valid_streams, st.integers(0, 400), st.integers(0, 255)
)
_truncated_streams = st.builds(
    lambda data, cut: data[: cut % (len(data) + 1)], _valid_streams, st.integers(0, 400)
)
_prefixed_noise = st.tuples(
    st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE, b""]),
    st.binary(max_size=150),
).map(lambda pair: pair[0] + pair[1])
_v2_noise = st.tuples(
    st.integers(0, 255), st.integers(0, 255), st.integers(0, 300), st.binary(max_size=300)
).map(
    lambda parts: V2_SIGNATURE
    + bytes([parts[0], parts[1]])
    + struct.pack("!H", parts[2])
    + parts[3]
)
streams = st.one_of(
    _valid_streams, _mutated_streams, _truncated_streams, _prefixed_noise, _v2_noise
)


def _outcome_whole(data: bytes) -> object:
    try:
        return ("result", ProxyHeaderParser().feed(data))
    except ProxyProtocolError:
        return ("error",)


def _outcome_split(data: bytes, cuts: list[int]) -> object:
    """Feed ``data`` in chunks; chunks after completion join the remainder."""
    bounds = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    parser = ProxyHeaderParser()
    try:
        for index, chunk in enumerate(chunks):
            result = parser.feed(chunk)
            if result is not None:
                info, remainder = result
                return ("result", (info, remainder + b"".join(chunks[index + 1 :])))
        return ("result", None)
    except ProxyProtocolError:
        return ("error",)


@settings(max_examples=500)
@given(streams, st.lists(st.integers(min_value=0, max_value=1000), max_size=12))
def test_split_anywhere_matches_whole(data: bytes, cuts: list[int]) -> None:
    """Fragmentation never changes the outcome, and only ProxyProtocolError escapes.

    Any other exception would propagate out of the helpers and fail the test.
    """
    assert _outcome_split(data, cuts) == _outcome_whole(data)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_bytewise(data: bytes) -> None:
    """Byte-at-a-time feeding of random input agrees with a single feed."""
    assert _outcome_split(data, list(range(len(data)))) == _outcome_whole(data)
