"""Property tests: random SMTP-ish byte streams, split at random points, never upset the core."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qpconn.core.events import ChunkEnd, Command, MessageData, MessageEnd, ProtocolError
from qpconn.core.reply import Reply
from qpconn.core.session import NEED_DATA, PAUSED, Limits, ServerSession
from tests.support.fuzz import FUZZ_SETTINGS, check_replies, split, stream_tokens

KEEP = 65536  # the most message text the core holds back when a line never ends

COMMANDS = [
    b"HELO client",
    b"EHLO client",
    b"MAIL FROM:<a@example.org>",
    b"MAIL FROM:<a@example.org> SIZE=" + b"9" * 30,
    b"mail from:",
    b"RCPT TO:<b@example.org>",
    b"RCPT <b@example.org>",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"VRFY postmaster",
    b"HELP",
    b"BDAT 10 LAST",
    b"BDAT 3",
    b"BDAT 0 LAST",
]
PIECES = [
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"..",
    b"\r\n.\r\n",
    b".\r\n",
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\0",
    b"\xff",
    b"\xc3\xa9",
    b" ",
    b"x" * 600,
    b"y" * 999,
    b"z" * 1001,
    b"w" * 70000,
]
# Gets a session into DATA when the responder says yes to each step.
PROLOGUE = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
LIMITS = [
    Limits(),
    Limits(text_line=0),
    Limits(message_size=64, text_line=20),
    Limits(utf8=True, message_size=5000),
]
# How the responder answers, in turn: mostly the stock answer, sometimes a refusal or a close.
ANSWERS = ["ok"] * 12 + ["refuse", "tempfail", "close"]

tokens = stream_tokens(COMMANDS, PIECES)
streams = st.tuples(
    st.sampled_from([b"", PROLOGUE]), st.lists(tokens, max_size=40).map(b"".join)
).map(b"".join)


def answer(event, kind):
    if isinstance(event, MessageEnd | ChunkEnd):
        stock = Reply(250, "2.0.0 queued")
    elif event.verb == "DATA":
        stock = Reply(354, "go ahead")
    elif event.verb == "QUIT":
        stock = Reply(221, "2.0.0 bye")
    else:
        stock = Reply(250, f"2.0.0 {event.verb} ok")
    if kind == "refuse":
        return Reply(550, "5.7.1 refused\r\n550 not injected"), False
    if kind == "tempfail":
        return Reply(451, "4.3.0 later"), False
    if kind == "close":
        return Reply(421, "4.3.2 closing"), False
    return stock, False


class Run:
    """One session fed ``chunks``; checks the memory bound as it goes."""

    def __init__(self, limits, answers, chunks):
        self.session = session = ServerSession(limits)
        self.events = []
        self.answered = 0
        self.errors = 0
        self.out = bytearray()
        session.greet(Reply(220, "fuzz.example ESMTP"))
        for chunk in chunks:
            session.receive_data(chunk)
            assert session.buffered <= 2 * KEEP + len(chunk)
            while True:
                event = session.next_event()
                if event is NEED_DATA or event is PAUSED:
                    break
                self.events.append(event)
                if isinstance(event, ProtocolError):
                    self.errors += 1
                elif isinstance(event, Command | MessageEnd | ChunkEnd):
                    kind = answers[self.answered % len(answers)]
                    reply, close = answer(event, kind)
                    session.send(reply, close=close)
                    self.answered += 1
            assert session.buffered <= KEEP
            self.out += session.data_to_send()

    def summary(self):
        """What must not depend on where the stream was split."""
        out = []
        text = bytearray()
        for event in self.events:
            if isinstance(event, MessageData):
                text += event.data
                continue
            if isinstance(event, ProtocolError):
                out.append(("error", event.reply.code))
            elif isinstance(event, MessageEnd | ChunkEnd):
                out.append((event, None if event.oversized else bytes(text)))
                text.clear()
            else:
                out.append(event)
        return out


@FUZZ_SETTINGS
@given(
    data=st.data(),
    stream=streams,
    limits=st.sampled_from(LIMITS),
    answers=st.lists(st.sampled_from(ANSWERS), min_size=1, max_size=8),
)
def test_random_streams_keep_replies_well_formed_counted_and_memory_bounded(
    data, stream, limits, answers
):
    chunks = data.draw(split(stream))
    run = Run(limits, answers, chunks)
    check_replies(bytes(run.out), run.answered, run.errors)
    if run.session.closed:
        assert run.session.buffered == 0

    whole = Run(limits, answers, [stream])
    assert whole.summary() == run.summary()
    assert whole.session.state is run.session.state
