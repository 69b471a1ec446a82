"""Framing of the byte stream: command lines and message text.

Everything here works on whole buffers with C-speed ``bytes`` methods (find, count,
replace), never a Python loop per line: a 100 KiB message costs a handful of scans, which
is what keeps large messages cheap (the per-line loop is what makes twisted.mail slow).

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

__all__ = ["DataReader", "take_line", "LINE_INCOMPLETE"]

_END = b"\r\n.\r\n"
_EMPTY_END = b".\r\n"
# Enough of a dropped over-long line to still recognise "\r\n.\r\n" across the cut.
_KEEP = len(_END) - 1

LINE_INCOMPLETE = None


def take_line(buf: bytearray) -> bytes | None:
    """Remove and return the first line of ``buf`` including its LF, or None if incomplete."""
    end = buf.find(b"\n")
    if end < 0:
        return LINE_INCOMPLETE
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

    def feed(self, buf: bytearray) -> tuple[bytes | None, bool]:
        """Consume message text from ``buf``; return (text or None, finished)."""
        if self._at_line_start and buf[:3] == _EMPTY_END:
            del buf[:3]
            return None, True
        end = buf.find(_END)
        if end >= 0:
            cut, skip, finished = end + 2, end + 5, True
        else:
            last = buf.rfind(b"\r\n")
            if last < 0:
                return self._cut_unterminated(buf), False
            cut = skip = last + 2
            finished = False
        with memoryview(buf) as view:
            region = bytes(view[:cut])
        del buf[:skip]
        return self._accept(region), finished

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
        text = self._accept(region)
        self._at_line_start = False
        return text

    def _accept(self, region: bytes) -> bytes | None:
        """Check and unstuff a run of text; return it unless the size is exceeded.

        The run starts where the buffer did and ends at a CRLF, or mid-line after a cut.
        """
        if not (self.bare_lf and self.bare_cr):
            crlf = region.count(b"\r\n")
            if region.count(b"\n") != crlf:
                self.bare_lf = True
            if region.count(b"\r") != crlf:
                self.bare_cr = True
        if self.normalize and (self.bare_lf or self.bare_cr):
            region = _normalize(region)
        if self.max_line and not self.long_line and len(region) > self.max_line:
            longest = max(map(len, region.split(b"\r\n")))
            # split() strips the CRLF, which counts towards the limit.
            if longest + 2 > self.max_line:
                self.long_line = True
        if self._at_line_start and region[:1] == b".":
            region = region[1:]
        self._at_line_start = True
        if b"\r\n." in region:
            region = region.replace(b"\r\n.", b"\r\n")
        self.size += len(region)
        if self.max_size and self.size > self.max_size:
            self.oversized = True
        if self.oversized:
            return None
        return region


def _normalize(region: bytes) -> bytes:
    """Every bare CR and bare LF as CRLF, as if the client had sent CRLF (three C scans).

    Safe on a run cut mid-line: a cut is made only where the buffer holds no CRLF, so a
    CR at the end of a run never has its LF at the start of the next one.
    """
    return region.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
