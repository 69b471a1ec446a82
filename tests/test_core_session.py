"""The sans-I/O session core, driven with bytes only: no sockets, no reactor."""

from __future__ import annotations

import pytest

from qpconn.core.events import Command, MessageData, MessageEnd, ProtocolError
from qpconn.core.reply import Reply
from qpconn.core.session import NEED_DATA, PAUSED, Limits, ServerSession, SessionError, State

KNOWN = {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP"}


def canned(event):
    """The stock answer: 354 for DATA, 221 for QUIT, 500 for unknown verbs, else 250."""
    if isinstance(event, MessageEnd):
        return Reply(250, "2.0.0 queued")
    if event.verb == "DATA":
        return Reply(354, "go ahead")
    if event.verb == "QUIT":
        return Reply(221, "2.0.0 bye")
    if event.verb not in KNOWN:
        return Reply(500, "5.5.1 Unrecognized command")
    return Reply(250, f"2.0.0 {event.verb} ok")


class Driver:
    """Feeds bytes to a session, answers every command, collects events and output."""

    def __init__(self, limits=None, answers=None, greet=True):
        self.session = ServerSession(limits)
        self.answers = answers or {}
        self.events = []
        self.out = bytearray()
        self.answered = 0
        if greet:
            self.session.greet(Reply(220, "test.example ESMTP"))
            self.flush()

    def answer_for(self, event):
        key = "." if isinstance(event, MessageEnd) else event.verb
        if key in self.answers:
            return self.answers[key]
        return canned(event)

    def feed(self, data):
        """Receive ``data`` and drive until the session needs more; return the new events."""
        start = len(self.events)
        self.session.receive_data(data)
        self.drive()
        return self.events[start:]

    def drive(self):
        session = self.session
        while True:
            event = session.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            self.events.append(event)
            if isinstance(event, Command | MessageEnd):
                answer = self.answer_for(event)
                reply, close = answer if isinstance(answer, tuple) else (answer, False)
                session.send(reply, close=close)
                self.answered += 1
        self.flush()

    def flush(self):
        self.out += self.session.data_to_send()

    def lines(self):
        return bytes(self.out).split(b"\r\n")[:-1]

    def codes(self):
        return [int(line[:3]) for line in self.lines()]


def merged(events):
    """Events with consecutive MessageData joined (their split depends on the chunking)."""
    out = []
    for event in events:
        if isinstance(event, MessageData) and out and isinstance(out[-1], MessageData):
            out[-1] = MessageData(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def text_of(events):
    return b"".join(e.data for e in events if isinstance(e, MessageData))


def driver_in(state, **kwargs):
    """A driver whose session has been walked into ``state``."""
    driver = Driver(**kwargs)
    steps = {
        State.INIT: b"",
        State.READY: b"EHLO client\r\n",
        State.MAIL: b"EHLO client\r\nMAIL FROM:<a@example.org>\r\n",
        State.RCPT: b"EHLO client\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n",
        State.DATA: b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n",
    }
    driver.feed(steps[state])
    assert driver.session.state is state
    driver.events.clear()
    driver.out.clear()
    return driver


SESSION = (
    b"EHLO client.example\r\n"
    b"MAIL FROM:<a@example.org> SIZE=100\r\n"
    b"RCPT TO:<b@example.org>\r\n"
    b"DATA\r\n"
    b"..stuffed first line\r\n"
    b"body\r\n"
    b".\r\n"
    b"QUIT\r\n"
)


# -- framing -------------------------------------------------------------------------------
def test_nothing_is_interpreted_before_the_greeting():
    session = ServerSession()
    session.receive_data(b"HELO early\r\n")
    assert session.next_event() is PAUSED
    assert session.data_to_send() == b""
    session.greet(Reply(220, "hi"))
    assert session.data_to_send() == b"220 hi\r\n"
    assert session.next_event() == Command("HELO", "early")


def test_a_refused_greeting_closes_and_releases_buffered_input():
    session = ServerSession()
    session.receive_data(b"HELO early\r\n")
    session.greet(Reply(554, "5.7.1 go away"))
    assert session.closed
    assert session.buffered == 0
    assert session.next_event() is PAUSED
    assert session.data_to_send() == b"554 5.7.1 go away\r\n"


def test_greeting_with_close_closes():
    session = ServerSession()
    session.greet(Reply(220, "hi"), close=True)
    assert session.closed


def test_greeting_twice_and_replying_with_nothing_pending_are_errors():
    session = ServerSession()
    session.greet(Reply(220, "hi"))
    with pytest.raises(SessionError):
        session.greet(Reply(220, "hi"))
    with pytest.raises(SessionError):
        session.send(Reply(250, "ok"))


def test_whole_session_gives_the_same_events_split_at_every_byte_boundary():
    whole = Driver()
    whole.feed(SESSION)
    expected = merged(whole.events)
    kinds = [Command] * 4 + [MessageData, MessageEnd, Command]
    assert [type(e) for e in expected] == kinds
    assert text_of(expected) == b".stuffed first line\r\nbody\r\n"
    for cut in range(len(SESSION) + 1):
        driver = Driver()
        driver.feed(SESSION[:cut])
        driver.feed(SESSION[cut:])
        assert merged(driver.events) == expected, cut
        assert driver.out == whole.out, cut


def test_whole_session_byte_by_byte_gives_the_same_events():
    whole = Driver()
    whole.feed(SESSION)
    driver = Driver()
    for i in range(len(SESSION)):
        driver.feed(SESSION[i : i + 1])
    assert merged(driver.events) == merged(whole.events)
    assert driver.out == whole.out
    assert driver.session.closed


def test_a_partial_line_needs_data():
    session = ServerSession()
    session.greet(Reply(220, "hi"))
    session.receive_data(b"NOOP")
    assert session.next_event() is NEED_DATA
    session.receive_data(b"\r")
    assert session.next_event() is NEED_DATA
    session.receive_data(b"\n")
    assert session.next_event() == Command("NOOP", "")


def test_pipelined_commands_come_out_one_at_a_time_after_each_reply():
    session = ServerSession()
    session.greet(Reply(220, "hi"))
    session.receive_data(b"HELO a\r\nNOOP\r\nQUIT\r\n")
    assert session.next_event() == Command("HELO", "a")
    assert session.pending == Command("HELO", "a")
    assert session.next_event() is PAUSED
    assert session.next_event() is PAUSED
    session.send(Reply(250, "hello"))
    assert session.pending is None
    assert session.next_event() == Command("NOOP", "")
    assert session.next_event() is PAUSED
    session.send(Reply(250, "ok"))
    assert session.next_event() == Command("QUIT", "")
    session.send(Reply(221, "bye"))
    assert session.next_event() is PAUSED
    assert session.data_to_send() == b"220 hi\r\n250 hello\r\n250 ok\r\n221 bye\r\n"
    assert session.data_to_send() == b""


def test_protocol_errors_do_not_pause_and_replies_stay_in_order():
    driver = Driver()
    driver.feed(b"NOOP\r\nDATA\r\nNOOP 2\r\n")
    assert [type(e) for e in driver.events] == [Command, ProtocolError, Command]
    assert driver.codes() == [220, 250, 503, 250]


# -- the state table -----------------------------------------------------------------------
VERBS = {
    "HELO": b"HELO client",
    "EHLO": b"EHLO client",
    "MAIL": b"MAIL FROM:<x@example.org>",
    "RCPT": b"RCPT TO:<y@example.org>",
    "DATA": b"DATA",
    "RSET": b"RSET",
    "NOOP": b"NOOP",
    "QUIT": b"QUIT",
    "VRFY": b"VRFY postmaster",
    "HELP": b"HELP",
    "XYZZY": b"XYZZY magic",
}
SEQUENCE_ERRORS = {
    (State.INIT, "MAIL"): "Error: send HELO/EHLO first",
    (State.INIT, "RCPT"): "Error: send HELO/EHLO first",
    (State.INIT, "DATA"): "Error: send HELO/EHLO first",
    (State.READY, "RCPT"): "Error: need MAIL command",
    (State.READY, "DATA"): "Error: need MAIL command",
    (State.MAIL, "MAIL"): "Error: nested MAIL command",
    (State.MAIL, "DATA"): "Error: need RCPT command",
    (State.RCPT, "MAIL"): "Error: nested MAIL command",
}


@pytest.mark.parametrize("state", [State.INIT, State.READY, State.MAIL, State.RCPT])
@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_in_every_state_is_passed_on_or_refused_with_503(state, verb):
    driver = driver_in(state)
    (event,) = driver.feed(VERBS[verb] + b"\r\n")
    expected = SEQUENCE_ERRORS.get((state, verb))
    if expected is None:
        assert isinstance(event, Command)
        assert event.verb == verb
    else:
        assert event == ProtocolError(Reply(503, f"5.5.1 {expected}"), VERBS[verb] + b"\r\n")
        assert driver.lines() == [f"503 5.5.1 {expected}".encode()]
        assert driver.session.state is state


def test_data_after_only_refused_recipients_gets_554_no_valid_recipients():
    driver = driver_in(State.MAIL, answers={"RCPT": Reply(550, "5.1.1 no such user")})
    driver.feed(b"RCPT TO:<nobody@example.org>\r\nDATA\r\n")
    assert driver.session.rcpt_attempts == 1
    assert driver.lines()[-1] == b"554 5.5.1 Error: no valid recipients"
    driver.answers.clear()
    driver.feed(b"RSET\r\nMAIL FROM:<a@example.org>\r\nDATA\r\n")
    assert driver.session.rcpt_attempts == 0
    assert driver.lines()[-1] == b"503 5.5.1 Error: need RCPT command"


@pytest.mark.parametrize(
    ("state", "line", "text"),
    [
        (State.INIT, b"HELO", "5.5.4 Syntax: HELO hostname"),
        (State.INIT, b"HELO   ", "5.5.4 Syntax: HELO hostname"),
        (State.INIT, b"EHLO", "5.5.4 Syntax: EHLO hostname"),
        (State.READY, b"VRFY", "5.5.4 Syntax: VRFY address"),
        (State.RCPT, b"DATA now", "5.5.4 Syntax: DATA takes no argument"),
        (State.READY, b"RSET all", "5.5.4 Syntax: RSET takes no argument"),
        (State.READY, b"QUIT now", "5.5.4 Syntax: QUIT takes no argument"),
        (State.READY, b"MAIL", "5.5.4 Syntax: MAIL FROM:<address>"),
        (State.READY, b"MAIL <a@example.org>", "5.5.4 Syntax: MAIL FROM:<address>"),
        (State.READY, b"MAIL TO:<a@example.org>", "5.5.4 Syntax: MAIL FROM:<address>"),
        (State.MAIL, b"RCPT <b@example.org>", "5.5.4 Syntax: RCPT TO:<address>"),
        (State.MAIL, b"RCPT", "5.5.4 Syntax: RCPT TO:<address>"),
    ],
)
def test_argument_rules_answer_501_and_change_nothing(state, line, text):
    driver = driver_in(state)
    (event,) = driver.feed(line + b"\r\n")
    assert isinstance(event, ProtocolError)
    assert event.reply == Reply(501, text)
    assert driver.session.state is state
    assert driver.session.pending is None


def test_verbs_are_case_insensitive_and_mail_arg_keeps_what_follows_the_colon():
    driver = driver_in(State.READY)
    assert driver.feed(b"mail from: <a@example.org> SIZE=10  \r\n") == [
        Command("MAIL", " <a@example.org> SIZE=10")
    ]
    assert driver.feed(b"rCpT To:<b@example.org>\r\n") == [Command("RCPT", "<b@example.org>")]
    assert driver.feed(b"quit \r\n") == [Command("QUIT", "")]


def test_noop_and_help_take_an_optional_argument():
    driver = driver_in(State.INIT)
    assert driver.feed(b"NOOP hello\r\nHELP mail\r\n") == [
        Command("NOOP", "hello"),
        Command("HELP", "mail"),
    ]


def test_ehlo_sets_esmtp_and_helo_clears_it():
    driver = driver_in(State.INIT)
    assert not driver.session.esmtp
    driver.feed(b"EHLO a\r\n")
    assert driver.session.esmtp
    driver.feed(b"HELO a\r\n")
    assert not driver.session.esmtp
    assert driver.session.state is State.READY


def test_a_second_ehlo_is_allowed_and_resets_the_transaction():
    driver = driver_in(State.RCPT)
    assert driver.feed(b"EHLO again\r\n") == [Command("EHLO", "again")]
    assert driver.session.state is State.READY
    assert driver.session.rcpt_attempts == 0
    assert driver.feed(b"MAIL FROM:<a@example.org>\r\n") == [Command("MAIL", "<a@example.org>")]


def test_a_refused_ehlo_changes_nothing():
    driver = driver_in(State.INIT, answers={"EHLO": Reply(550, "5.7.1 no")})
    driver.feed(b"EHLO a\r\n")
    assert driver.session.state is State.INIT
    assert not driver.session.esmtp


@pytest.mark.parametrize("reset", [b"RSET", b"HELO again", b"EHLO again"])
def test_rset_and_helo_reset_the_transaction(reset):
    driver = driver_in(State.RCPT)
    driver.feed(reset + b"\r\n")
    assert driver.session.state is State.READY
    assert driver.session.rcpt_attempts == 0
    (event,) = driver.feed(b"MAIL FROM:<c@example.org>\r\n")
    assert event == Command("MAIL", "<c@example.org>")


def test_rset_before_helo_stays_before_helo():
    driver = driver_in(State.INIT)
    driver.feed(b"RSET\r\n")
    assert driver.session.state is State.INIT


def test_a_refused_mail_changes_nothing():
    driver = driver_in(State.READY, answers={"MAIL": Reply(550, "5.7.1 no")})
    driver.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
    assert driver.session.state is State.READY
    assert driver.lines()[-1] == b"503 5.5.1 Error: need MAIL command"


def test_a_refused_rcpt_changes_nothing_but_counts_the_attempt():
    driver = driver_in(State.RCPT)
    driver.answers["RCPT"] = Reply(450, "4.2.0 later")
    driver.feed(b"RCPT TO:<c@example.org>\r\n")
    assert driver.session.state is State.RCPT
    assert driver.session.rcpt_attempts == 2


def test_a_refused_data_leaves_the_next_line_a_command():
    driver = driver_in(State.RCPT, answers={"DATA": Reply(554, "5.5.1 no")})
    assert driver.feed(b"DATA\r\nNOOP\r\n") == [Command("DATA"), Command("NOOP")]
    assert driver.session.state is State.RCPT


def test_reset_transaction_forgets_the_transaction():
    driver = driver_in(State.RCPT)
    driver.session.reset_transaction()
    assert driver.session.state is State.READY
    assert driver.session.rcpt_attempts == 0


@pytest.mark.parametrize("answer", [Reply(421, "4.3.2 shutting down"), (Reply(250, "ok"), True)])
def test_a_closing_reply_stops_interpretation(answer):
    driver = driver_in(State.READY, answers={"MAIL": answer})
    events = driver.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
    assert events == [Command("MAIL", "<a@example.org>")]
    assert driver.session.closed
    assert driver.session.buffered == 0
    assert driver.feed(b"NOOP\r\n") == []
    assert len(driver.lines()) == 1


def test_quit_answered_221_closes():
    driver = driver_in(State.READY)
    driver.feed(b"QUIT\r\nNOOP\r\n")
    assert driver.session.closed
    assert driver.lines() == [b"221 2.0.0 bye"]


def test_unsolicited_421_closes_even_with_a_command_pending():
    session = ServerSession()
    session.greet(Reply(220, "hi"))
    session.receive_data(b"NOOP\r\nNOOP\r\n")
    assert isinstance(session.next_event(), Command)
    session.send_unsolicited(Reply(421, "4.4.2 timeout"))
    assert session.closed
    assert session.next_event() is PAUSED
    with pytest.raises(SessionError):
        session.send(Reply(250, "late"))
    assert session.data_to_send().endswith(b"421 4.4.2 timeout\r\n")


def test_the_message_reply_ends_the_transaction_whatever_its_code():
    driver = driver_in(State.DATA, answers={".": Reply(554, "5.7.1 spam")})
    driver.feed(b"hi\r\n.\r\n")
    assert driver.session.state is State.READY
    assert driver.lines() == [b"554 5.7.1 spam"]


# -- line rules ----------------------------------------------------------------------------
def test_a_512_octet_command_line_is_accepted_and_513_is_too_long():
    driver = driver_in(State.INIT)
    ok = b"NOOP " + b"x" * 505 + b"\r\n"
    assert len(ok) == 512
    assert driver.feed(ok) == [Command("NOOP", "x" * 505)]
    (event,) = driver.feed(b"NOOP " + b"x" * 506 + b"\r\n")
    assert event.reply == Reply(500, "5.5.2 Line too long")
    assert driver.feed(b"NOOP\r\n") == [Command("NOOP")]


def test_mail_and_rcpt_get_26_more_octets():
    driver = driver_in(State.READY)
    head = b"MAIL FROM:<a@example.org>"
    ok = head + b" X=" + b"y" * (538 - len(head) - 5) + b"\r\n"
    assert len(ok) == 538
    assert isinstance(driver.feed(ok)[0], Command)
    driver = driver_in(State.READY)
    (event,) = driver.feed(head + b" X=" + b"y" * (539 - len(head) - 5) + b"\r\n")
    assert event.reply.code == 500
    assert driver.feed(b"RSET\r\n") == [Command("RSET")]


def test_a_line_that_never_ends_is_answered_once_and_dropped_as_it_arrives():
    driver = driver_in(State.INIT)
    chunk = b"x" * 65536
    for _ in range(16):  # 1 MiB
        driver.feed(chunk)
        assert driver.session.buffered <= 538
    assert driver.lines() == [b"500 5.5.2 Line too long"]
    assert driver.feed(b"yyy\r\nNOOP\r\n") == [Command("NOOP")]
    assert len(driver.lines()) == 2


def test_an_unfinished_line_is_answered_as_soon_as_it_is_too_long():
    driver = driver_in(State.INIT)
    assert driver.feed(b"NOOP " + b"x" * 533) == []
    (event,) = driver.feed(b"x")
    assert event == ProtocolError(Reply(500, "5.5.2 Line too long"), b"")


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b"NOOP\n", "5.5.2 Bare LF received; lines must end with CRLF"),
        (b"\n", "5.5.2 Bare LF received; lines must end with CRLF"),
        (b"NO\rOP\r\n", "5.5.2 Bare CR in command"),
        (b"NOOP\r\r\n", "5.5.2 Bare CR in command"),
        (b"NOOP \x00\r\n", "5.5.2 NUL character in command"),
        (b"NOOP caf\xc3\xa9\r\n", "5.5.2 Non-ASCII characters in command"),
        (b"NOOP \xff\r\n", "5.5.2 Non-ASCII characters in command"),
    ],
)
def test_bad_characters_are_answered_500_and_the_next_command_works(line, text):
    driver = driver_in(State.INIT)
    events = driver.feed(line + b"NOOP\r\n")
    assert events == [ProtocolError(Reply(500, text), line), Command("NOOP")]
    assert driver.codes() == [500, 250]


def test_utf8_is_accepted_when_allowed():
    driver = driver_in(State.READY, limits=Limits(utf8=True))
    assert driver.feed("MAIL FROM:<josé@exämple.org>\r\n".encode()) == [
        Command("MAIL", "<josé@exämple.org>")
    ]
    (event,) = driver.feed(b"RCPT TO:<\xff@example.org>\r\n")
    assert event.reply == Reply(500, "5.5.2 Invalid UTF-8 in command")


def test_an_empty_line_goes_to_the_application():
    driver = driver_in(State.INIT)
    assert driver.feed(b"\r\n") == [Command("", "")]
    assert driver.codes() == [500]


# -- DATA ----------------------------------------------------------------------------------
def test_leading_dots_are_unstuffed_on_every_line():
    driver = driver_in(State.DATA)
    events = driver.feed(b"..first\r\nplain\r\n..later\r\n...\r\n.x\r\na.b\r\n.\r\n")
    assert text_of(events) == b".first\r\nplain\r\n.later\r\n..\r\nx\r\na.b\r\n"
    assert events[-1] == MessageEnd(size=len(text_of(events)))


def test_an_empty_message_ends_right_after_354():
    driver = driver_in(State.DATA)
    assert driver.feed(b".\r\n") == [MessageEnd(size=0)]
    assert driver.session.state is State.READY


def test_the_end_marker_is_found_split_at_every_boundary():
    stream = b"line one\r\nline two\r\n.\r\nNOOP\r\n"
    for cut in range(len(stream) + 1):
        for cut2 in range(cut, len(stream) + 1):
            driver = driver_in(State.DATA)
            driver.feed(stream[:cut])
            driver.feed(stream[cut:cut2])
            driver.feed(stream[cut2:])
            assert merged(driver.events) == [
                MessageData(b"line one\r\nline two\r\n"),
                MessageEnd(size=20),
                Command("NOOP"),
            ], (cut, cut2)


@pytest.mark.parametrize(
    ("sequence", "bare_lf", "bare_cr"),
    [
        (b"\n.\n", True, False),
        (b"\n.\r\n", True, False),
        (b"\r.\r", False, True),
        (b"\r\n.\n", True, False),
        (b"\r\n.\r", False, True),
        (b"\r.\r\n", False, True),
    ],
)
def test_smuggling_sequences_never_end_the_data_and_are_flagged(sequence, bare_lf, bare_cr):
    driver = driver_in(State.DATA)
    smuggled = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.org>\r\n"
    events = driver.feed(b"Subject: x\r\n\r\nhello" + sequence + smuggled + b".\r\nNOOP\r\n")
    *data, end, noop = merged(events)
    assert noop == Command("NOOP")
    assert isinstance(end, MessageEnd)
    assert (end.bare_lf, end.bare_cr) == (bare_lf, bare_cr)
    assert data[0].data.endswith(smuggled)
    assert not any(isinstance(e, Command) and e.verb in ("MAIL", "RCPT") for e in events)


def test_an_oversized_message_is_read_to_its_end_without_passing_text_past_the_limit():
    driver = driver_in(State.DATA, limits=Limits(message_size=100))
    passed = 0
    for _ in range(50):
        events = driver.feed(b"0123456789" * 3 + b"\r\n")
        passed += len(text_of(events))
    assert passed <= 100
    events = driver.feed(b".\r\nNOOP\r\n")
    assert events == [MessageEnd(size=50 * 32, oversized=True), Command("NOOP")]


def test_a_message_exactly_at_the_size_limit_is_not_oversized():
    driver = driver_in(State.DATA, limits=Limits(message_size=12))
    events = driver.feed(b"..hello\r\nab\r\n.\r\n")
    assert text_of(events) == b".hello\r\nab\r\n"
    assert events[-1] == MessageEnd(size=12)


@pytest.mark.parametrize("chunk", [1, 7, 100, 4096])
@pytest.mark.parametrize(("length", "flagged"), [(1000, False), (1001, True), (1002, True)])
def test_a_text_line_longer_than_1000_octets_with_crlf_is_flagged(length, flagged, chunk):
    driver = driver_in(State.DATA)
    stream = b"short\r\n" + b"x" * (length - 2) + b"\r\nend\r\n.\r\n"
    for i in range(0, len(stream), chunk):
        driver.feed(stream[i : i + chunk])
    end = driver.events[-1]
    assert isinstance(end, MessageEnd)
    assert end.long_line is flagged
    assert end.size == len(stream) - 3


def test_without_a_line_limit_a_huge_line_is_passed_on_intact():
    driver = driver_in(State.DATA, limits=Limits(text_line=0))
    line = bytes(range(32, 127)) * 3000  # ~285 KB, no line end
    for i in range(0, len(line), 8192):
        driver.feed(line[i : i + 8192])
        assert driver.session.buffered <= 65536 + 8192
    events = driver.feed(b"\r\n.\r\n")
    assert text_of(driver.events) == line + b"\r\n"
    assert events[-1] == MessageEnd(size=len(line) + 2)


def test_text_after_the_end_marker_is_the_next_command():
    driver = driver_in(State.DATA)
    events = driver.feed(b"hi\r\n.\r\nQUIT\r\n")
    assert events == [MessageData(b"hi\r\n"), MessageEnd(size=4), Command("QUIT")]
    assert driver.session.closed
    assert driver.codes() == [250, 221]


def test_a_10_mb_message_without_line_ends_keeps_memory_bounded():
    driver = driver_in(State.DATA, limits=Limits(message_size=1_000_000))
    chunk = b"y" * 65536
    total = 0
    for _ in range(160):
        driver.feed(chunk)
        total += len(chunk)
        assert driver.session.buffered <= 1000
    assert len(text_of(driver.events)) <= 1_000_000
    events = driver.feed(b"\r\n.\r\nNOOP\r\n")
    end = events[-2]
    assert end == MessageEnd(size=total + 2, oversized=True, long_line=True)
    assert events[-1] == Command("NOOP")


def test_bare_lf_inside_an_endless_line_is_still_flagged():
    driver = driver_in(State.DATA, limits=Limits(text_line=0))
    driver.feed(b"a\n.\n" + b"z" * 70000)
    (end,) = [e for e in driver.feed(b"\r\n.\r\n") if isinstance(e, MessageEnd)]
    assert end.bare_lf


def test_an_oversized_message_does_not_hold_an_unfinished_line_in_the_buffer():
    driver = driver_in(State.DATA, limits=Limits(message_size=10))
    driver.feed(b"x" * 20 + b"\r\n")
    assert driver.feed(b"y\r\n" + b"z" * 5000) == []
    assert driver.session.buffered <= 1000


def test_shared_limits_are_read_only_and_a_session_changes_its_own_copy():
    shared = Limits(message_size=1000).shared()
    with pytest.raises(AttributeError, match="shared by every session"):
        shared.message_size = 5
    first, second = ServerSession(shared), ServerSession(shared)
    assert first.limits is second.limits  # one object for the server, not one per session
    mine = first.own_limits()
    mine.lmtp = True
    assert first.own_limits() is mine and first.limits is mine
    assert second.limits is shared and not shared.lmtp and shared.message_size == 1000
    assert mine.message_size == 1000
