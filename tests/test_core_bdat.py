"""The session core's CHUNKING (BDAT) and LMTP rules, driven with bytes only."""

from __future__ import annotations

import pytest

from qpconn.core.events import ChunkEnd, ChunkStart, Command, MessageData, MessageEnd, ProtocolError
from qpconn.core.receive import parse_bdat
from qpconn.core.reply import Reply
from qpconn.core.session import NEED_DATA, PAUSED, Limits, ServerSession, SessionError, State

ENVELOPE = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\n"


class Driver:
    """Answers every command 250 (DATA 354, chunks as ``chunk_reply`` says)."""

    def __init__(self, limits: Limits | None = None, chunk_reply: Reply | None = None) -> None:
        self.session = ServerSession(limits)
        self.session.greet(Reply(220, "mx.test ESMTP"))
        self.chunk_reply = chunk_reply or Reply(250, "2.0.0 chunk ok")
        self.events: list[object] = []
        self.out = bytearray(self.session.data_to_send())

    def feed(self, data: bytes) -> list[object]:
        start = len(self.events)
        self.session.receive_data(data)
        for _ in range(10_000):
            event = self.session.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            self.events.append(event)
            if isinstance(event, ChunkEnd):
                self.session.send(self.chunk_reply)
            elif isinstance(event, MessageEnd):
                self.session.send(Reply(250, "2.0.0 queued"))
            elif isinstance(event, Command):
                code = 354 if event.verb == "DATA" else 250
                self.session.send(Reply(code, f"{event.verb} ok"))
        self.out += self.session.data_to_send()
        return self.events[start:]

    def codes(self) -> list[int]:
        return [int(line[:3]) for line in bytes(self.out).split(b"\r\n") if line[3:4] == b" "]

    def text(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, MessageData))


def test_parse_bdat() -> None:
    assert parse_bdat("10") == (10, False)
    assert parse_bdat("0 last") == (0, True)
    for bad in ("", "x", "-1", "1 2", "10 LAST more", "1e3", "١٢", "9" * 19):
        assert parse_bdat(bad) is None, bad


def test_chunks_are_read_raw_exactly_and_answered_one_each() -> None:
    d = Driver()
    d.feed(ENVELOPE)
    raw = b"Subject: x\r\n\r\n.\r\nQUIT\r\n\n"  # dots, a command-looking line, a bare LF
    events = d.feed(b"BDAT %d\r\n" % len(raw) + raw + b"BDAT 3 LAST\r\nend")
    assert isinstance(events[0], ChunkStart) and events[0].first and not events[0].last
    ends = [e for e in events if isinstance(e, ChunkEnd)]
    assert [(e.size, e.last, e.total) for e in ends] == [(len(raw), False, len(raw)),
                                                          (3, True, len(raw) + 3)]
    starts = [e for e in events if isinstance(e, ChunkStart)]
    assert [s.first for s in starts] == [True, False]
    assert d.text() == raw + b"end"
    assert d.codes() == [220, 250, 250, 250, 250, 250]
    assert d.session.state is State.READY and not d.session.bdat_active


def test_chunk_split_over_many_receives() -> None:
    d = Driver()
    d.feed(ENVELOPE + b"BDAT 10 LAST\r\n")
    for byte in b"0123456789":
        d.feed(bytes([byte]))
    assert d.text() == b"0123456789"
    assert isinstance(d.events[-1], ChunkEnd) and d.events[-1].total == 10
    d.feed(b"NOOP\r\n")
    assert d.codes()[-1] == 250


def test_zero_length_last_chunk() -> None:
    d = Driver()
    events = d.feed(ENVELOPE + b"BDAT 2\r\nab" + b"BDAT 0 LAST\r\n")
    assert [e.size for e in events if isinstance(e, ChunkEnd)] == [2, 0]
    assert d.session.state is State.READY


@pytest.mark.parametrize(
    ("before", "code"),
    [
        (b"EHLO c.test\r\n", 503),  # no MAIL
        (b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n", 503),  # no RCPT
        (b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\n", 503),  # not EHLO
    ],
)
def test_out_of_place_bdat_skips_its_octets_then_503(before: bytes, code: int) -> None:
    d = Driver()
    d.feed(before)
    events = d.feed(b"BDAT 12\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
    errors = [e for e in events if isinstance(e, ProtocolError)]
    assert [e.reply.code for e in errors] == [code]
    # Exactly 12 octets were skipped: the third NOOP is a command again.
    assert [e.verb for e in events if isinstance(e, Command)] == ["NOOP"]
    assert not any(isinstance(e, MessageData | ChunkStart) for e in events)


def test_no_valid_recipients_is_554() -> None:
    d = Driver()
    d.feed(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")
    d.session.rcpt_attempts = 1  # as after a refused RCPT
    events = d.feed(b"BDAT 1 LAST\r\nx")
    assert [e.reply.code for e in events if isinstance(e, ProtocolError)] == [554]


@pytest.mark.parametrize("arg", [b"BDAT\r\n", b"BDAT ten\r\n", b"BDAT 5 FIRST\r\n", b"BDAT -5\r\n"])
def test_malformed_size_is_501_and_closes(arg: bytes) -> None:
    d = Driver()
    d.feed(ENVELOPE)
    events = d.feed(arg + b"hello")
    assert [e.reply.code for e in events if isinstance(e, ProtocolError)] == [501]
    assert d.session.closed


def test_size_limit_spans_chunks() -> None:
    d = Driver(Limits(message_size=10), chunk_reply=None)
    d.feed(ENVELOPE)
    events = d.feed(b"BDAT 6\r\nabcdef" + b"BDAT 6 LAST\r\nghijkl" + b"NOOP\r\n")
    ends = [e for e in events if isinstance(e, ChunkEnd)]
    assert [(e.total, e.oversized) for e in ends] == [(6, False), (12, True)]
    assert d.text() == b"abcdef"  # nothing past the limit was handed on
    assert [e.verb for e in events if isinstance(e, Command)] == ["NOOP"]


def test_data_and_rcpt_refused_during_bdat_then_rset_clears() -> None:
    d = Driver()
    d.feed(ENVELOPE + b"BDAT 3\r\nabc")
    assert d.session.bdat_active
    events = d.feed(b"DATA\r\nRCPT TO:<v@mx.test>\r\n")
    assert [e.reply.code for e in events if isinstance(e, ProtocolError)] == [503, 503]
    d.feed(b"RSET\r\n")
    assert not d.session.bdat_active and d.session.bdat_total == 0


def test_refused_chunk_ends_the_transaction_and_later_chunks_get_503() -> None:
    d = Driver(chunk_reply=Reply(554, "5.7.1 no"))
    d.feed(ENVELOPE)
    events = d.feed(b"BDAT 3\r\nabcBDAT 3 LAST\r\ndefNOOP\r\n")
    assert [type(e).__name__ for e in events if not isinstance(e, MessageData)] == [
        "ChunkStart", "ChunkEnd", "ProtocolError", "Command"]
    assert d.codes()[-3:] == [554, 503, 250]


def test_pipelined_chunks_wait_for_each_reply() -> None:
    session = ServerSession()
    session.greet(Reply(220, "hi"))
    session.receive_data(ENVELOPE + b"BDAT 1\r\naBDAT 1 LAST\r\nb")
    for verb in ("EHLO", "MAIL", "RCPT"):
        event = session.next_event()
        assert isinstance(event, Command) and event.verb == verb
        session.send(Reply(250, "ok"))
    seen = []
    for _ in range(20):
        event = session.next_event()
        if event is PAUSED:
            break
        seen.append(event)
    # Stopped at the first ChunkEnd: the second chunk is not read before its reply.
    assert isinstance(seen[-1], ChunkEnd) and not seen[-1].last
    assert session.buffered == len(b"BDAT 1 LAST\r\nb")


def test_chunking_off_leaves_bdat_to_the_application() -> None:
    d = Driver(Limits(chunking=False))
    events = d.feed(ENVELOPE + b"BDAT 1 LAST\r\n")
    assert [e.verb for e in events if isinstance(e, Command)][-1] == "BDAT"


def test_lmtp_mode_lhlo_only() -> None:
    d = Driver(Limits(lmtp=True))
    events = d.feed(b"HELO c\r\nEHLO c\r\nLHLO c\r\n")
    assert [e.reply.code for e in events if isinstance(e, ProtocolError)] == [500, 500]
    assert [e.verb for e in events if isinstance(e, Command)] == ["EHLO"]
    assert d.session.state is State.READY and d.session.esmtp


def test_intermediate_replies_only_at_message_end() -> None:
    d = Driver()
    with pytest.raises(SessionError):
        d.session.send_intermediate(Reply(250, "x"))


def test_more_octets_than_announced_are_read_as_the_next_command() -> None:
    d = Driver()
    events = d.feed(ENVELOPE + b"BDAT 3 LAST\r\nabcNOOP\r\n")
    assert d.text() == b"abc"
    assert isinstance(events[-2], ChunkEnd) and events[-1] == Command("NOOP")
