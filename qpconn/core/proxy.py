"""Sans-I/O parser for the HAProxy PROXY protocol, versions 1 and 2.

A load balancer in front of the SMTP server hides the real client address; the
PROXY protocol has the balancer prepend a small header carrying it.  Because
the client address drives policy decisions (relaying, rate limits, DNSBL
checks), a sloppy parser is a security problem: the parser below is strict,
rejects anything it does not fully understand, and never buffers more than the
largest header it is willing to accept, so a hostile peer cannot make it
allocate memory or spoof an address through a lenient corner case.

The parser performs no I/O.  The transport feeds it whatever bytes arrive and
gets back either ``None`` (need more), a complete result together with the
bytes that followed the header (the start of the SMTP session), or a
:class:`ProxyProtocolError`.

Reference: HAProxy's ``doc/proxy-protocol.txt``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "V1_MAX_LENGTH",
    "V2_HEADER_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeaderParser",
    "ProxyInfo",
    "ProxyProtocolError",
]

#: Longest v1 line the specification allows, CRLF included ("PROXY UNKNOWN"
#: followed by the maximum amount of ignored text).
V1_MAX_LENGTH = 107

#: Every v1 header starts with these bytes.
V1_PREFIX = b"PROXY "

#: The fixed 12-byte v2 signature.  It starts with CRLF CRLF NUL so that it can
#: never be mistaken for the start of a text protocol such as SMTP or v1.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

#: Signature + version/command + family/transport + 16-bit length.
V2_HEADER_LENGTH = 16

#: What may follow ``"PROXY "`` in a v1 line.  "UNKNOWN" must be followed by a
#: space (then arbitrary text) or directly by the CRLF.
_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")

#: Bytes that may appear in the body of a TCP4/TCP6 v1 line: hexadecimal
#: digits, the IPv4 and IPv6 separators and the field separator.  Checking this
#: while the line is still incomplete lets garbage be rejected early.
_V1_TCP_CHARS = b"0123456789abcdefABCDEF.: "

#: A v1 port: decimal, no sign, no leading zeros (so the text is canonical and
#: "080" cannot be read differently by two parsers).  The range is checked
#: separately.
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")

_V2_VERSION = 2
_V2_CMD_LOCAL = 0x0
_V2_CMD_PROXY = 0x1

_V2_FAMILY_UNSPEC = 0x00
_V2_FAMILY_TCP4 = 0x11
_V2_FAMILY_TCP6 = 0x21
_V2_FAMILY_UNIX_STREAM = 0x31

#: Size of the address block for each family/transport byte we accept with the
#: PROXY command.  UDP and the unix datagram family are deliberately absent: an
#: SMTP server only ever sits behind a stream proxy, so those indicate a
#: misconfiguration and the connection is refused.
_V2_ADDRESS_SIZES = {
    _V2_FAMILY_UNSPEC: 0,
    _V2_FAMILY_TCP4: 12,
    _V2_FAMILY_TCP6: 36,
    _V2_FAMILY_UNIX_STREAM: 216,
}

#: The v2 length field is 16 bits wide; nothing larger can be expressed.
_V2_MAX_DECLARED_LENGTH = 0xFFFF

#: A TLV is a 1-byte type followed by a big-endian 16-bit value length.
_TLV_HEADER_LENGTH = 3


class ProxyProtocolError(ValueError):
    """Malformed or unacceptable header; the server closes the connection.

    It derives from :class:`ValueError` because it describes bad input data,
    so callers that already treat ``ValueError`` as "reject the peer" keep
    working.
    """


@dataclass(frozen=True)
class ProxyInfo:
    """What a PROXY header told us about the proxied connection.

    ``command`` is ``"PROXY"`` when the header relays a connection,
    ``"LOCAL"`` for a v2 connection the proxy made on its own behalf (health
    checks) and ``"UNKNOWN"`` for v1 ``PROXY UNKNOWN``.  ``source`` and
    ``destination`` are ``None`` whenever no usable IP address was conveyed
    (LOCAL, UNKNOWN, or a v2 PROXY header with the UNSPEC or unix family); in
    that case the server must keep using the real peer address of the socket.
    Addresses are in :mod:`ipaddress` canonical text form.
    """

    command: str
    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


class ProxyHeaderParser:
    """Incremental parser for one PROXY protocol header (v1 or v2).

    Feed bytes as they arrive, in fragments of any size (even one byte).  The
    version is decided from the first byte: ``P`` starts v1 and CR starts the
    v2 signature; anything else is rejected at once, because a connection that
    is expected to carry a PROXY header but does not is either misconfigured
    or an attempt to bypass the proxy and must not be served.

    Errors are raised as soon as the bytes received so far cannot be the
    prefix of any acceptable header, and the parser never holds more than the
    largest header it accepts (:data:`V1_MAX_LENGTH` bytes for v1,
    ``16 + max_v2_length`` for v2).  Once it has raised, every later call
    raises again; once it has returned a result it must not be fed again.
    """

    def __init__(self, max_v2_length: int = 4096) -> None:
        """Create a parser.

        ``max_v2_length`` bounds the v2 length field (the bytes after the
        16-byte fixed header), which otherwise lets a peer make us buffer up to
        64 KiB before anything can be validated.  The default leaves ample
        room for the address block plus the TLVs real proxies send.
        """
        if not 0 <= max_v2_length <= _V2_MAX_DECLARED_LENGTH:
            raise ValueError(f"max_v2_length must be between 0 and {_V2_MAX_DECLARED_LENGTH}")
        self._max_v2_length = max_v2_length
        self._buf = bytearray()
        self._error: str | None = None
        self._done = False

    def feed(self, data: bytes) -> tuple[ProxyInfo, bytes] | None:
        """Consume ``data``; return ``(info, remainder)`` once the header is complete.

        ``None`` means more bytes are needed.  ``remainder`` holds every byte
        received after the header, which belongs to the SMTP session and must
        be passed on unchanged.  Raises :class:`ProxyProtocolError` for a
        malformed or unacceptable header.
        """
        if self._done:
            raise RuntimeError("the PROXY header has already been parsed")
        if self._error is not None:
            raise ProxyProtocolError(self._error)
        try:
            return self._feed(bytes(data))
        except ProxyProtocolError as exc:
            # Make the failure sticky and drop the buffer: the connection is
            # about to be closed, nothing else may be derived from it.
            self._error = str(exc)
            self._buf = bytearray()
            raise

    def _feed(self, data: bytes) -> tuple[ProxyInfo, bytes] | None:
        """Move just enough of ``data`` into the buffer and examine it.

        Bytes are only copied into the buffer up to the size the header can
        still have, so the buffer stays bounded however much the peer sends
        at once; anything beyond is handed back untouched as the remainder.
        Each round either completes the header, raises, or learns something
        (the version, the v2 length) that raises the wanted size, so the loop
        always terminates.
        """
        offset = 0
        while True:
            room = self._wanted() - len(self._buf)
            if room > 0:
                chunk = data[offset : offset + room]
                self._buf += chunk
                offset += len(chunk)
            found = self._examine()
            if found is not None:
                info, header_length = found
                remainder = bytes(self._buf[header_length:]) + data[offset:]
                self._buf = bytearray()
                self._done = True
                return info, remainder
            if offset >= len(data):
                return None

    def _wanted(self) -> int:
        """Return how many bytes the header may need in total, as far as known."""
        buf = self._buf
        if not buf:
            return 1  # one byte decides the version
        if buf[0] == V1_PREFIX[0]:
            return V1_MAX_LENGTH
        if len(buf) < V2_HEADER_LENGTH:
            return V2_HEADER_LENGTH
        return V2_HEADER_LENGTH + int.from_bytes(buf[14:16], "big")

    def _examine(self) -> tuple[ProxyInfo, int] | None:
        """Validate the buffer; return ``(info, header length)`` when complete."""
        buf = self._buf
        if not buf:
            return None
        if buf[0] == V1_PREFIX[0]:
            return self._examine_v1()
        if buf[0] == V2_SIGNATURE[0]:
            return self._examine_v2()
        raise ProxyProtocolError("data does not start with a PROXY protocol header")

    # -- version 1 -----------------------------------------------------------

    def _examine_v1(self) -> tuple[ProxyInfo, int] | None:
        """Check a (possibly partial) v1 line; parse it once the CRLF is in."""
        buf = self._buf
        size = len(buf)
        if buf[: len(V1_PREFIX)] != V1_PREFIX[:size]:
            raise ProxyProtocolError("data does not start with a PROXY protocol header")
        body = buf[len(V1_PREFIX) :]
        if body and not any(body[: len(proto)] == proto[: len(body)] for proto in _V1_PROTOCOLS):
            raise ProxyProtocolError("unsupported PROXY v1 protocol")

        # The line ends at the first CR, which must be followed by LF; an LF
        # anywhere before that is a bare LF.  Tolerating either would let two
        # parsers disagree on where the header ends.
        cr = buf.find(b"\r")
        lf = buf.find(b"\n")
        if lf != -1 and (cr == -1 or lf < cr):
            raise ProxyProtocolError("PROXY v1 line ends with a bare LF")
        line_end = cr if cr != -1 else size
        # Skip "TCP4"/"TCP6" itself (4 bytes); everything up to the CR must
        # be address, port or separator characters.
        tcp_fields = buf[len(V1_PREFIX) + 4 : line_end]
        if body[:3] == b"TCP" and tcp_fields.translate(None, _V1_TCP_CHARS):
            raise ProxyProtocolError("invalid character in PROXY v1 line")
        if cr != -1 and cr + 1 < size:
            if buf[cr + 1] != ord("\n"):
                raise ProxyProtocolError("PROXY v1 line has a CR not followed by LF")
            return _parse_v1_line(bytes(buf[:cr])), cr + 2
        if size >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
        return None

    # -- version 2 -----------------------------------------------------------

    def _examine_v2(self) -> tuple[ProxyInfo, int] | None:
        """Check a (possibly partial) v2 header field by field as it arrives."""
        buf = self._buf
        size = len(buf)
        if buf[: len(V2_SIGNATURE)] != V2_SIGNATURE[:size]:
            raise ProxyProtocolError("data does not start with a PROXY protocol header")
        if size <= 12:
            return None

        version, command = buf[12] >> 4, buf[12] & 0x0F
        if version != _V2_VERSION:
            raise ProxyProtocolError(f"unsupported PROXY v2 version {version}")
        if command not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
            raise ProxyProtocolError(f"unsupported PROXY v2 command {command}")
        if size <= 13:
            return None

        # For LOCAL the receiver must ignore the family (and the whole address
        # block), so only PROXY headers are held to the families we support.
        family = buf[13]
        if command == _V2_CMD_PROXY and family not in _V2_ADDRESS_SIZES:
            raise ProxyProtocolError(
                f"unsupported PROXY v2 address family/transport 0x{family:02x}"
            )
        if size < V2_HEADER_LENGTH:
            return None

        length = int.from_bytes(buf[14:16], "big")
        if length > self._max_v2_length:
            raise ProxyProtocolError(
                f"PROXY v2 header length {length} exceeds {self._max_v2_length}"
            )
        if command == _V2_CMD_PROXY and length < _V2_ADDRESS_SIZES[family]:
            raise ProxyProtocolError(
                f"PROXY v2 header length {length} too short for family 0x{family:02x}"
            )
        total = V2_HEADER_LENGTH + length
        if size < total:
            return None

        payload = bytes(buf[V2_HEADER_LENGTH:total])
        if command == _V2_CMD_LOCAL:
            return ProxyInfo("LOCAL", 2, None, None), total
        return _parse_v2_payload(family, payload), total


def _parse_v1_line(line: bytes) -> ProxyInfo:
    """Parse a complete v1 line (without its CRLF).

    The caller has already checked the prefix, the protocol word and, for
    TCP lines, the character set.
    """
    rest = line[len(V1_PREFIX) :]
    if rest == b"UNKNOWN" or rest.startswith(b"UNKNOWN "):
        # The specification says anything after UNKNOWN must be ignored.
        return ProxyInfo("UNKNOWN", 1, None, None)

    fields = rest.split(b" ")
    if len(fields) != 5 or not all(fields):
        raise ProxyProtocolError("PROXY v1 line must have 5 fields separated by single spaces")
    protocol, src_addr, dst_addr, src_port, dst_port = fields
    family: type[ipaddress.IPv4Address | ipaddress.IPv6Address]
    family = ipaddress.IPv4Address if protocol == b"TCP4" else ipaddress.IPv6Address
    return ProxyInfo(
        "PROXY",
        1,
        (_v1_address(family, src_addr), _v1_port(src_port)),
        (_v1_address(family, dst_addr), _v1_port(dst_port)),
    )


def _v1_address(family: type[ipaddress.IPv4Address | ipaddress.IPv6Address], text: bytes) -> str:
    """Validate a v1 address against the family named by the protocol word."""
    try:
        address = family(text.decode("ascii"))
    except ValueError as exc:  # includes UnicodeDecodeError, AddressValueError
        raise ProxyProtocolError(f"invalid {family.__name__[:4]} address in PROXY v1 line") from exc
    return str(address)


def _v1_port(text: bytes) -> int:
    """Validate a v1 port: canonical decimal within 0..65535."""
    if _V1_PORT.fullmatch(text) is None:
        raise ProxyProtocolError("invalid port in PROXY v1 line")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyProtocolError("port out of range in PROXY v1 line")
    return port


def _parse_v2_payload(family: int, payload: bytes) -> ProxyInfo:
    """Decode the address block of a PROXY command and check the TLV framing.

    TLV contents are not interpreted (nothing in the server needs them yet),
    but their framing is verified so that a corrupt or truncated header is
    refused instead of being half-trusted.
    """
    address_size = _V2_ADDRESS_SIZES[family]
    _check_tlvs(payload[address_size:])
    if family == _V2_FAMILY_TCP4:
        return ProxyInfo(
            "PROXY",
            2,
            (_v2_ip(payload[0:4]), _v2_port(payload[8:10])),
            (_v2_ip(payload[4:8]), _v2_port(payload[10:12])),
        )
    if family == _V2_FAMILY_TCP6:
        return ProxyInfo(
            "PROXY",
            2,
            (_v2_ip(payload[0:16]), _v2_port(payload[32:34])),
            (_v2_ip(payload[16:32]), _v2_port(payload[34:36])),
        )
    # UNSPEC or unix stream: no IP address to report, keep the real peer.
    return ProxyInfo("PROXY", 2, None, None)


def _v2_ip(packed: bytes) -> str:
    """Render a packed 4- or 16-byte address in canonical text form."""
    return str(ipaddress.ip_address(packed))


def _v2_port(packed: bytes) -> int:
    """Decode a big-endian 16-bit port (every value is valid)."""
    return int.from_bytes(packed, "big")


def _check_tlvs(data: bytes) -> None:
    """Verify that ``data`` is exactly a sequence of well-formed TLVs."""
    offset = 0
    while offset < len(data):
        if offset + _TLV_HEADER_LENGTH > len(data):
            raise ProxyProtocolError("truncated TLV header in PROXY v2 header")
        value_length = int.from_bytes(data[offset + 1 : offset + 3], "big")
        offset += _TLV_HEADER_LENGTH + value_length
        if offset > len(data):
            raise ProxyProtocolError("truncated TLV value in PROXY v2 header")
