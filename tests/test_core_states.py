"""The state machine's tables (qpconn.core.states): complete, consistent, and true to bytes.

Each row of TRANSITIONS and REFUSALS is exercised through a real ServerSession fed with
bytes, so a row that says one thing while the session does another fails here; and a row
added without a script to exercise it fails too.
"""

from __future__ import annotations

import pytest

from qpconn.core import states
from qpconn.core.events import (
    AuthResponse,
    ChunkEnd,
    ChunkStart,
    Command,
    MessageEnd,
    ProtocolError,
)
from qpconn.core.reply import Reply
from qpconn.core.session import _READERS, NEED_DATA, PAUSED, Limits, ServerSession
from qpconn.core.states import (
    COMMANDS,
    CONDITIONS,
    REFUSALS,
    REFUSALS_BY_VERB,
    TRANSITIONS,
    Reading,
    State,
)

#: the states in which command lines are read (and so judged by REFUSALS)
COMMAND_STATES = (State.INIT, State.READY, State.MAIL, State.RCPT)
#: the stock answer for each kind of pending event on the way to a row
STOCK = {"DATA": 354, "AUTH": 334, "STARTTLS": 220, "QUIT": 221}


class Script:
    """Feeds bytes and answers every pending event (STOCK codes, else 250) but the last."""

    def __init__(self, limits: Limits | None = None, greet: bool = True) -> None:
        self.session = ServerSession(limits)
        self.events: list[object] = []
        if greet:
            self.session.greet(Reply(220, "mx.test ESMTP"))

    def feed(self, data: bytes, answer_last: bool = True) -> list[object]:
        """Receive ``data``; answer what is pending, except the last event if not asked."""
        start = len(self.events)
        session = self.session
        session.receive_data(data)
        for _ in range(1000):
            event = session.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            self.events.append(event)
            if session.pending is None:
                continue
            if not answer_last and not session.buffered and not isinstance(event, ChunkStart):
                break
            session.send(Reply(self.stock(event), "ok"))
        return self.events[start:]

    @staticmethod
    def stock(event: object) -> int:
        return STOCK.get(event.verb, 250) if isinstance(event, Command) else 250


def pending_after(prelude: bytes, *, limits: Limits | None = None) -> Script:
    """A session in which the last event of ``prelude`` waits for its reply."""
    script = Script(limits)
    script.feed(prelude, answer_last=False)
    assert script.session.pending is not None, script.events
    return script


ENVELOPE = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\n"


#: answers -> how to reach a session where that row applies; returns the script and a
#: function that makes the transition happen with a given code.
def _reply(script: Script):
    return lambda code: script.session.send(Reply(code, "x"))


def _at(answers: str) -> tuple[Script, object]:
    if answers == states.GREETING:
        script = Script(greet=False)
        return script, lambda code: script.session.greet(Reply(code, "x"))
    if answers == states.IMPLICIT_TLS:
        script = Script(greet=False)
        return script, lambda code: script.session.tls_started()
    if answers == states.TLS_HANDSHAKE:
        script = Script()
        script.feed(b"EHLO c.test\r\nSTARTTLS\r\n")
        assert script.session.state is State.STARTTLS
        return script, lambda code: script.session.tls_started()
    if answers == states.TRANSACTION_RESET:
        script = Script()
        script.feed(ENVELOPE + b"BDAT 2\r\nab")
        assert script.session.bdat_active and script.session.rcpt_attempts == 1
        return script, lambda code: script.session.reset_transaction()
    if answers == states.CHUNK_SIZE_UNKNOWN:
        script = Script()
        script.feed(ENVELOPE)
        return script, lambda code: script.feed(b"BDAT ten\r\n")
    if answers == states.CHUNK_LINE:
        script = Script()
        script.feed(ENVELOPE)
        return script, lambda code: script.feed(b"BDAT 3\r\n")
    if answers == states.CORE_REFUSAL:
        script = pending_after(b"EHLO c.test\r\nAUTH PLAIN\r\n")  # then a line the core refuses
        script.session.send(Reply(334, ""))
        return script, lambda code: script.feed(b"\x00\r\n")
    preludes = {
        "HELO": b"HELO c.test\r\n",
        "EHLO": b"EHLO c.test\r\n",
        "MAIL": b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n",
        "RCPT": ENVELOPE,
        "RSET": ENVELOPE + b"RSET\r\n",
        "DATA": ENVELOPE + b"DATA\r\n",
        "STARTTLS": b"EHLO c.test\r\nSTARTTLS\r\n",
        "AUTH": b"EHLO c.test\r\nAUTH PLAIN\r\n",
        "XCLIENT": b"EHLO c.test\r\nXCLIENT ADDR=192.0.2.7\r\n",
        states.MESSAGE_END: ENVELOPE + b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n",
        states.CHUNK: ENVELOPE + b"BDAT 3\r\nabc",
        states.LAST_CHUNK: ENVELOPE + b"BDAT 3 LAST\r\nabc",
        states.SASL_RESPONSE: b"EHLO c.test\r\nAUTH PLAIN\r\ndGVzdA==\r\n",
    }
    script = pending_after(preludes[answers])
    return script, _reply(script)


def _codes(row: states.Transition) -> list[int]:
    """Reply codes to try for a row: its ends, and one in between, never a closing one."""
    codes = row.codes
    low, high = max(codes.start, 200), min(codes.stop - 1, 599)
    picks = {low, high, (low + high) // 2}
    return sorted(code for code in picks if code not in states.CLOSING_CODES)


@pytest.mark.parametrize(
    ("row", "code"),
    [(row, code) for row in TRANSITIONS for code in _codes(row)],
    ids=lambda value: value if isinstance(value, int) else f"{value.answers}",
)
def test_each_transition_through_bytes_gives_its_named_next_state(row, code):
    script, happen = _at(row.answers)
    session = script.session
    before = session.state
    if row.answers == states.SASL_RESPONSE:
        assert isinstance(session.pending, AuthResponse)
    happen(code)
    if row.closes:
        assert session.closed
        return
    if row.ends_transaction:
        before = states.AFTER_TRANSACTION.get(before, before)
    assert session.state is (row.to if row.to is not None else before)
    assert session.reading is row.reads
    for name, value in row.flags:
        assert getattr(session, name) is value, name
    if row.ends_transaction:
        assert session.rcpt_attempts == 0 and session.bdat_total == 0
        assert not session.bdat_active
    if row.drops_input:
        session.receive_data(b"RSET\r\n")  # clear text after the 220: never interpreted
        assert session.buffered == 0 and session.next_event() is PAUSED


def test_every_transition_row_has_a_script():
    for row in TRANSITIONS:
        _at(row.answers)  # raises KeyError for an answer no script reaches


@pytest.mark.parametrize("verb", ["HELO", "MAIL", "RCPT", "NOOP", "VRFY"])
def test_a_reply_no_row_names_changes_nothing(verb):
    preludes = {
        "HELO": b"EHLO c.test\r\nHELO c.test\r\n",
        "MAIL": b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n",
        "RCPT": ENVELOPE,
        "NOOP": ENVELOPE + b"NOOP\r\n",
        "VRFY": ENVELOPE + b"VRFY u\r\n",
    }
    script = pending_after(preludes[verb])
    session = script.session
    before = (session.state, session.esmtp, session.rcpt_attempts)
    session.send(Reply(550, "5.0.0 no"))
    assert (session.state, session.esmtp, session.rcpt_attempts) == before
    assert session.reading is Reading.COMMAND


# -- the shape of the tables ------------------------------------------------------------------
def test_every_state_is_reached_by_a_row_or_is_the_start_or_the_end():
    reached = {row.to for row in TRANSITIONS if row.to is not None}
    reached |= set(states.AFTER_TRANSACTION.values())
    assert reached | {State.GREETING, State.CLOSED} == set(State)


def test_every_row_for_a_verb_names_a_verb_of_the_command_table():
    # The session finds a verb's reply rows through states.VERBS, built from COMMANDS.
    special = {value for name, value in vars(states).items() if type(value) is str}
    for row in TRANSITIONS:
        if row.answers not in special:
            assert row.answers in COMMANDS, row.answers
            assert row in states.VERBS[row.answers].replies


def test_every_state_has_a_row_for_every_command_verb():
    for verb in COMMANDS:
        assert set(REFUSALS_BY_VERB[verb]) == set(State), verb


def test_every_kind_of_input_has_its_reader_and_a_row_that_reads_it():
    assert set(_READERS) == set(Reading)
    assert {row.reads for row in TRANSITIONS} == set(Reading)


def test_codes_of_one_answer_do_not_overlap_so_row_order_never_matters():
    by_answer: dict[str, list[range]] = {}
    for row in TRANSITIONS:
        by_answer.setdefault(row.answers, []).append(row.codes)
    for answers, ranges in by_answer.items():
        for i, first in enumerate(ranges):
            for second in ranges[i + 1 :]:
                assert not set(first) & set(second), answers


def test_refusal_rows_name_known_verbs_and_conditions_the_session_has():
    for row in REFUSALS:
        assert row.verbs <= set(COMMANDS), row
        if row.when is not None:
            assert row.when in CONDITIONS, row
            assert hasattr(ServerSession(), row.when), row.when


def test_no_unconditional_refusal_names_a_state_where_its_verb_is_legal():
    for row in REFUSALS:
        if row.when is None:
            for verb in row.verbs:
                assert not row.states & COMMANDS[verb].legal_in, (verb, row.text)


def test_a_verb_out_of_place_always_meets_an_unconditional_refusal():
    for verb, rule in COMMANDS.items():
        for state in COMMAND_STATES:
            rows = REFUSALS_BY_VERB[verb][state]
            if state in rule.legal_in:
                assert all(row.when is not None for row in rows), (verb, state)
            else:
                assert rows and rows[-1].when is None, (verb, state)


def test_rules_with_a_prefix_or_a_required_argument_have_a_usage_text():
    for verb, rule in COMMANDS.items():
        if rule.prefix:
            assert rule.argument == "required", verb
        if rule.argument == "required":
            assert rule.usage.startswith("5.5.4 Syntax: "), verb


# -- every refusal row, through bytes -------------------------------------------------------
#: (verb, the row's text) -> (limits, bytes that reach the row's state and condition, then
#: the command itself). Every verb of every row has one.
REFUSAL_SCRIPTS: dict[tuple[str, str], tuple[dict, bytes]] = {
    ("STARTTLS", "5.5.1 Error: TLS already active"): ({"tls": True}, b"EHLO c\r\nSTARTTLS\r\n"),
    ("AUTH", "5.5.1 Error: already authenticated"): (
        {"authenticated": True},
        b"EHLO c\r\nAUTH PLAIN AGEAYg==\r\nAUTH PLAIN\r\n",
    ),
    ("STARTTLS", "5.5.1 Error: MAIL transaction in progress"): ({}, ENVELOPE + b"STARTTLS\r\n"),
    ("AUTH", "5.5.1 Error: MAIL transaction in progress"): (
        {},
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nAUTH PLAIN\r\n",
    ),
    ("STARTTLS", "5.5.1 Error: send EHLO first"): ({}, b"STARTTLS\r\n"),
    ("AUTH", "5.5.1 Error: send EHLO first"): ({}, b"AUTH PLAIN\r\n"),
    ("DATA", "5.5.1 Error: {verb} not allowed during a BDAT transfer"): (
        {},
        ENVELOPE + b"BDAT 1\r\nxDATA\r\n",
    ),
    ("RCPT", "5.5.1 Error: {verb} not allowed during a BDAT transfer"): (
        {},
        ENVELOPE + b"BDAT 1\r\nxRCPT TO:<v@mx.test>\r\n",
    ),
    ("BDAT", "5.5.1 Error: send EHLO first"): (
        {},
        b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@x>\r\nBDAT 1\r\nx",
    ),
    ("MAIL", "5.5.1 Error: send HELO/EHLO first"): ({}, b"MAIL FROM:<a@b>\r\n"),
    ("RCPT", "5.5.1 Error: send HELO/EHLO first"): ({}, b"RCPT TO:<u@x>\r\n"),
    ("DATA", "5.5.1 Error: send HELO/EHLO first"): ({}, b"DATA\r\n"),
    ("MAIL", "5.5.1 Error: nested MAIL command"): ({}, ENVELOPE + b"MAIL FROM:<a@b>\r\n"),
    ("RCPT", "5.5.1 Error: need MAIL command"): ({}, b"EHLO c\r\nRCPT TO:<u@x>\r\n"),
    ("DATA", "5.5.1 Error: need MAIL command"): ({}, b"EHLO c\r\nDATA\r\n"),
    ("BDAT", "5.5.1 Error: need MAIL command"): ({}, b"EHLO c\r\nBDAT 1\r\nx"),
    ("DATA", "5.5.1 Error: no valid recipients"): (
        {"refuse_rcpt": True},
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@x>\r\nDATA\r\n",
    ),
    ("BDAT", "5.5.1 Error: no valid recipients"): (
        {"refuse_rcpt": True},
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@x>\r\nBDAT 1\r\nx",
    ),
    ("DATA", "5.5.1 Error: need RCPT command"): ({}, b"EHLO c\r\nMAIL FROM:<a@b>\r\nDATA\r\n"),
    ("BDAT", "5.5.1 Error: need RCPT command"): ({}, b"EHLO c\r\nMAIL FROM:<a@b>\r\nBDAT 1\r\nx"),
}


def _refusal_cases() -> list[tuple[str, states.Refusal]]:
    return [(verb, row) for row in REFUSALS for verb in sorted(row.verbs)]


@pytest.mark.parametrize(("verb", "row"), _refusal_cases(), ids=lambda v: getattr(v, "text", v))
def test_each_refusal_row_answers_through_bytes(verb, row):
    setup, data = REFUSAL_SCRIPTS[(verb, row.text)]
    session = ServerSession()
    if setup.get("tls"):
        session.tls_started()  # implicit TLS
    session.greet(Reply(220, "mx.test ESMTP"))
    errors: list[ProtocolError] = []
    session.receive_data(data)
    for _ in range(100):
        event = session.next_event()
        if event is NEED_DATA or event is PAUSED:
            break
        if isinstance(event, ProtocolError):
            errors.append(event)
        elif isinstance(event, Command | MessageEnd | ChunkEnd | AuthResponse):
            code = 250
            if isinstance(event, Command):
                if event.verb == "RCPT" and setup.get("refuse_rcpt"):
                    code = 550
                elif event.verb == "AUTH" and setup.get("authenticated"):
                    code = 235
            session.send(Reply(code, "ok"))
    assert [e.reply.to_bytes() for e in errors] == [
        Reply(row.code, row.text.format(verb=verb)).to_bytes()
    ]
    assert errors[0].line.split(b" ")[0].rstrip(b"\r\n") == verb.encode()


def test_the_fallback_refusal_ends_every_illegal_compiled_row():
    # BDAT in INIT: helo_only always holds there, so the fallback is only the table's floor.
    rows = REFUSALS_BY_VERB["BDAT"][State.INIT]
    assert rows[-1] is states.OUT_OF_SEQUENCE
    assert states.refusals("MAIL", State.READY) == ()


def test_lmtp_verbs_are_judged_as_the_table_says():
    script = Script(Limits(lmtp=True))
    events = script.feed(b"HELO c\r\nEHLO c\r\nLHLO c\r\n")
    errors = [e for e in events if isinstance(e, ProtocolError)]
    refusal = Reply(states.LMTP_REFUSAL.code, states.LMTP_REFUSAL.text)
    assert [e.reply.to_bytes() for e in errors] == [refusal.to_bytes()] * 2
    assert [e.verb for e in events if isinstance(e, Command)] == [states.LMTP_VERBS["LHLO"]]
    assert script.session.esmtp and script.session.state is State.READY
