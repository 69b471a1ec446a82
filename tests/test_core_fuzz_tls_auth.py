"""Property tests: random streams through the core's STARTTLS and SASL states.

The responder says yes to STARTTLS (220), challenges AUTH (334) and accepts or refuses
responses; between two chunks it "completes the handshake" (``tls_started``) when a 220
went out. Whatever the bytes and wherever they are split, the core never raises, every
reply is well formed and answers exactly one event, memory stays bounded, nothing that
followed a 220 to STARTTLS in clear text becomes an event, and no credentials (an AUTH
line, a SASL response) end up in a ProtocolError.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qpconn.core.events import AuthResponse, Command, MessageEnd, ProtocolError
from qpconn.core.reply import Reply
from qpconn.core.session import NEED_DATA, PAUSED, Limits, ServerSession, State
from qpconn.core.states import Reading
from tests.support.fuzz import FUZZ_SETTINGS, check_replies, split, stream_tokens

SECRET = b"c2VjcmV0LXB3"  # base64 of a "password", as a SASL response would carry it

COMMANDS = [
    b"EHLO client",
    b"STARTTLS",
    b"STARTTLS now",
    b"AUTH PLAIN",
    b"AUTH PLAIN " + SECRET,
    b"AUTH LOGIN",
    b"AUTH",
    b"*",
    SECRET,
    b"!!not base64",
    b"MAIL FROM:<a@example.org>",
    b"RCPT TO:<b@example.org>",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"QUIT",
]
PIECES = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b"\xff",
    b" ",
    b"A" * 600,
    b"A" * 13000,
    b"\r\n.\r\n",
]
ANSWERS = ["ok"] * 6 + ["refuse", "close"]

tokens = stream_tokens(COMMANDS, PIECES)
streams = st.tuples(
    st.sampled_from([b"", b"EHLO c\r\n", b"EHLO c\r\nSTARTTLS\r\n", b"EHLO c\r\nAUTH LOGIN\r\n"]),
    st.lists(tokens, max_size=40).map(b"".join),
).map(b"".join)


def answer(event: Command | MessageEnd | AuthResponse, kind: str, turn: int) -> Reply:
    if kind == "refuse":
        return Reply(535 if isinstance(event, AuthResponse) else 550, "5.7.1 no")
    if kind == "close":
        return Reply(421, "4.3.2 closing")
    if isinstance(event, MessageEnd):
        return Reply(250, "2.0.0 queued")
    if isinstance(event, AuthResponse):
        return Reply(334, "UGFzc3dvcmQ6") if turn % 2 else Reply(235, "2.7.0 ok")
    if event.verb == "STARTTLS":
        return Reply(220, "2.0.0 Ready to start TLS")
    if event.verb == "AUTH":
        return Reply(334, "")
    if event.verb == "DATA":
        return Reply(354, "go ahead")
    if event.verb == "QUIT":
        return Reply(221, "2.0.0 bye")
    return Reply(250, f"2.0.0 {event.verb} ok")


@FUZZ_SETTINGS
@given(
    data=st.data(),
    stream=streams,
    answers=st.lists(st.sampled_from(ANSWERS), min_size=1, max_size=8),
)
def test_starttls_and_sasl_states_never_break_under_random_streams(data, stream, answers):
    limits = Limits()
    session = ServerSession(limits)
    session.greet(Reply(220, "fuzz.example ESMTP"))
    out = bytearray()
    answered = errors = handshakes = 0
    bound = limits.auth_line + limits.command_line
    for chunk in data.draw(split(stream)):
        session.receive_data(chunk)
        assert session.buffered <= bound + len(chunk)
        while True:
            in_sasl = session.reading is Reading.SASL_RESPONSE  # the next line answers a 334
            event = session.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            if isinstance(event, ProtocolError):
                errors += 1
                if in_sasl:
                    assert event.line == b"", event.line  # a response is never kept
                assert not event.line.upper().startswith(b"AUTH ") or event.line == (
                    b"AUTH <redacted>\r\n"
                )
            elif isinstance(event, Command | MessageEnd | AuthResponse):
                kind = answers[answered % len(answers)]
                reply = answer(event, kind, answered)
                session.send(reply)
                answered += 1
                if reply.code == 220:
                    # The clear text after STARTTLS is gone at once, and stays unread.
                    assert session.state is State.STARTTLS
                    assert session.buffered == 0
                    assert session.next_event() is PAUSED
        assert session.buffered <= bound
        out += session.data_to_send()
        if session.state is State.STARTTLS:
            # What the chunk still held after the 220 must not survive the handshake.
            session.tls_started()
            handshakes += 1
            assert session.tls_active and session.state is State.INIT
            assert not session.authenticated and not session.esmtp
            assert session.buffered == 0
    out += session.data_to_send()
    check_replies(bytes(out), answered, errors)
    assert handshakes <= 1  # STARTTLS once TLS is active is always refused
    if session.closed:
        assert session.buffered == 0
