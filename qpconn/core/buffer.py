"""Scanning the receive buffer: one line off its front, and message text up to its end.

The readers in :mod:`qpconn.core.receive` cut the session's buffer with these.

Everything here works on whole buffers with C-speed scans (``bytes.find``/``replace``, io's
newline decoder), never a Python loop per line and no list of lines: a 100 KiB message
costs a few scans, which is what keeps large messages cheap (the per-line loop is what
makes twisted.mail slow).

Two rules are kept here and nowhere else:

* message text ends only on ``CRLF . CRLF``. A bare LF or bare CR never ends it, whatever
  dot follows (``\\n.\\n``, ``\\n.\\r\\n``, ``\\r.\\r`` ...): those sequences are what SMTP
  smuggling relies on. They are reported so the application can refuse the message,
  or, with ``normalize``, turned into CRLF in the text handed on (Postfix's
  ``smtpd_forbid_bare_newline = normalize``): the end marker is still only ``CRLF . CRLF``.
* memory stays bounded whatever the client sends: a line that never ends is handed on as
  it arrives (counted, checked and unstuffed like any other text, never silently lost),
  keeping only the few bytes needed to recognise the end marker.
"""

from __future__ import annotations

from io import IncrementalNewlineDecoder

__all__ = ["DataReader", "take_line", "has_long_line", "LINE_INCOMPLETE"]

_END = b"\r\n.\r\n"
_EMPTY_END = b".\r\n"
# Enough of a dropped over-long line to still recognise "\r\n.\r\n" across the cut.
_KEEP = len(_END) - 1
_CRLF_DOT = b"\r\n."
# IncrementalNewlineDecoder.newlines (the line ends met) -> (bare LF, bare CR) met.
_LONE: dict[str | tuple[str, ...] | None, tuple[bool, bool]] = {
    None: (False, False),
    "\r\n": (False, False),
    "\n": (True, False),
    "\r": (False, True),
    ("\n", "\r\n"): (True, False),
    ("\r", "\r\n"): (False, True),
    ("\r", "\n"): (True, True),
    ("\r", "\n", "\r\n"): (True, True),
}
# Below this line length (a tiny max_line) the long-line check simply splits the lines.
_MIN_REACH = 64
# After a dot inside a line, how far feed() searches for "\r\n." before using memchr again.
_STRETCH = 4096

LINE_INCOMPLETE = None


def take_line(buf: bytearray) -> bytes | None:
    """Remove and return the first line of ``buf`` including its LF, or None if incomplete."""
    end = buf.find(b"\n")
    if end < 0:
        return LINE_INCOMPLETE
    if end == len(buf) - 1:  # the usual case: the buffer holds exactly one line
        line = bytes(buf)
        buf.clear()
        return line
    line = bytes(buf[: end + 1])
    del buf[: end + 1]
    return line


class DataReader:
    """Reads one message's text from a shared receive buffer, after the 354 reply.

    ``feed`` consumes what it can from the buffer and returns the unstuffed text it
    completed and whether the end marker was reached. The buffer always starts at a line
    start except after an over-long line was cut, which ``_at_line_start`` tracks.
    """

    __slots__ = (
        "_at_line_start",
        "_seen",
        "bare_cr",
        "bare_lf",
        "long_line",
        "max_line",
        "max_size",
        "normalize",
        "oversized",
        "size",
    )

    def __init__(self, max_size: int = 0, max_line: int = 1000, normalize: bool = False) -> None:
        #: databytes: 0 means no limit. Text past it is read and dropped, never kept.
        self.max_size = max_size
        #: longest line allowed including CRLF (RFC 5321 §4.5.3.1.6); 0 means no limit.
        self.max_line = max_line
        #: turn bare CR and bare LF into CRLF (still reported in bare_cr/bare_lf)
        self.normalize = normalize
        self.size = 0
        self.oversized = False
        self.long_line = False
        self.bare_lf = False
        self.bare_cr = False
        self._at_line_start = True
        self._seen: IncrementalNewlineDecoder | None = None  # made on first use

    def feed(self, buf: bytearray) -> tuple[bytes | None, bool]:
        """Consume message text from ``buf``; return (text or None, finished)."""
        if self._at_line_start and buf[:3] == _EMPTY_END:
            del buf[:3]
            return None, True
        # One scan for "\r\n." finds both the end marker and any dot to unstuff: in the
        # usual text neither occurs, and the end marker search starts at the first hit.
        dot = _find_dot_line(buf)
        end = buf.find(_END, dot) if dot >= 0 else -1
        if end >= 0:
            cut, skip, finished = end + 2, end + 5, True
            stuffed = dot < end
        else:
            last = buf.rfind(b"\r\n")
            if last < 0:
                return self._cut_unterminated(buf), False
            cut = skip = last + 2
            finished = False
            stuffed = 0 <= dot < last
        with memoryview(buf) as view:
            region = bytes(view[:cut])
        del buf[:skip]
        return self._accept(region, stuffed), finished

    def _cut_unterminated(self, buf: bytearray) -> bytes | None:
        """Pass on most of a line that is already too long to keep whole.

        Only what may start the end marker stays buffered. The part taken counts towards
        the size and the bare CR/LF checks like any other text: a message that is one
        endless line must still be found oversized, and its bare LFs still reported.
        """
        limit = self.max_line or 65536
        cut = len(buf) - _KEEP
        if len(buf) <= limit or cut <= 0:
            return None
        if self.max_line:
            self.long_line = True
        with memoryview(buf) as view:
            region = bytes(view[:cut])
        del buf[:cut]
        # The buffer held no CRLF at all, so no "\r\n." either.
        text = self._accept(region, False)
        self._at_line_start = False
        return text

    def _accept(self, region: bytes, stuffed: bool) -> bytes | None:
        """Check and unstuff a run of text; return it unless the size is exceeded.

        The run starts where the buffer did and ends at a CRLF, or mid-line after a cut.
        ``stuffed`` says whether the run holds "\r\n." (the caller's scan found it).
        """
        lone_lf = lone_cr = True  # in this run; not looked for once both were seen
        if not (self.bare_lf and self.bare_cr):
            lone_lf, lone_cr = self._line_ends(region)
            self.bare_lf = self.bare_lf or lone_lf
            self.bare_cr = self.bare_cr or lone_cr
        if self.normalize and (lone_lf or lone_cr):
            region = _normalize(region)
            stuffed = _CRLF_DOT in region
        if self.max_line and not self.long_line and len(region) > self.max_line:
            self.long_line = has_long_line(region, self.max_line)
        if self._at_line_start and region[:1] == b".":
            region = region[1:]
        self._at_line_start = True
        if stuffed:
            region = region.replace(_CRLF_DOT, b"\r\n")
        self.size += len(region)
        if self.max_size and self.size > self.max_size:
            self.oversized = True
        if self.oversized:
            return None
        return region

    def _line_ends(self, region: bytes) -> tuple[bool, bool]:
        """Whether ``region`` holds a bare LF, a bare CR: one C pass over the text.

        io's newline decoder records which line ends it met (CR, LF, CRLF) in a single
        scan, where counting CRLF, CR and LF separately takes three, the CRLF one slow.
        Latin-1 maps every byte to one character, so nothing is lost or refused.
        """
        seen = self._seen
        if seen is None:
            seen = self._seen = IncrementalNewlineDecoder(None, False)
        else:
            seen.reset()
        seen.decode(region.decode("latin-1"), True)
        return _LONE[seen.newlines]


def _find_dot_line(buf: bytearray, stretch: int = _STRETCH) -> int:
    """Where the first "\r\n." of ``buf`` starts, or -1.

    Looking for the dot alone uses memchr, many times faster than a 3-byte search: text
    without dots (base64, most large bodies) is passed in one call. Where a dot starts
    no line, the 3-byte search covers the next ``stretch`` octets, so text full of dots
    costs about one plain 3-byte search plus one Python step per stretch.
    """
    pos = 2  # a dot that starts a line has a CRLF before it
    while True:
        dot = buf.find(b".", pos)
        if dot < 0:
            return -1
        if buf.startswith(b"\r\n", dot - 2):
            return dot - 2
        # Every "\r\n." whose dot lies in (dot, dot + stretch); memchr goes on from there.
        found = buf.find(_CRLF_DOT, dot + 1, dot + stretch)
        if found >= 0:
            return found
        pos = dot + stretch


def has_long_line(region: bytes, max_line: int) -> bool:
    """True when a line of ``region`` and its CRLF exceed ``max_line`` octets.

    A line is what lies between two CRLFs (a bare CR or LF does not end it), the text
    before the first and the text after the last included: exactly
    ``max(map(len, region.split(b"\r\n"))) + 2 > max_line``, without building a list of
    a thousand lines per 100 KiB. From a line start, the last CRLF within reach of
    ``max_line`` octets ends every line begun before it, all of them short enough, so
    the walk jumps there: about one C-speed ``rfind`` per ``max_line`` octets. No CRLF
    within reach means the line starting there is too long (or is the unended tail).
    """
    longest = max_line - 1  # a line this long plus its CRLF is over the limit
    if longest < _MIN_REACH:
        return max(map(len, region.split(b"\r\n"))) >= longest
    return _reaches(region, longest)


def _reaches(region: bytes, longest: int) -> bool:
    """True when a line of ``region`` (CRLF not counted) is ``longest`` octets or more."""
    size = len(region)
    rfind = region.rfind
    start = 0  # always a line start
    while start < size:
        reach = start + longest + 1  # a CRLF ending the line must have its LF before this
        crlf = rfind(b"\r\n", start, reach)
        if crlf < 0:
            return reach <= size or size - start >= longest
        start = crlf + 2
    return False


def _normalize(region: bytes) -> bytes:
    """Every bare CR and bare LF as CRLF, as if the client had sent CRLF (three C scans).

    Safe on a run cut mid-line: a cut is made only where the buffer holds no CRLF, so a
    CR at the end of a run never has its LF at the start of the next one.
    """
    return region.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
