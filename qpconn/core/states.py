"""The SMTP session's state machine, as tables: which command is legal when, and what a
reply does.

Everything that decides a session's state lives here (h11's ``_state.py`` is the model);
:class:`qpconn.core.session.ServerSession` looks the rows up and applies them, and no
other module decides a state change. The rules this module keeps, and no other does:

1. **Which command is legal in which state**, and what argument it takes: :data:`COMMANDS`.
   A verb absent there is not the core's to judge: it goes to the application (the
   unrecognized_command hook, or a protocol subclass). BDAT is the core's only while
   CHUNKING is offered (``Limits.chunking``).
2. **Which refusal a command out of place gets**: :data:`REFUSALS`, read in order. The first
   row naming the verb and the session's state whose condition holds answers, so the client
   learns why; a command no row refuses is accepted in the states its :data:`COMMANDS` row
   names and gets :data:`OUT_OF_SEQUENCE` elsewhere. STARTTLS once encrypted and AUTH once
   authenticated (RFC 3207 §4, RFC 4954 §4), DATA or RCPT during a BDAT transfer (RFC 3030
   §3), DATA or BDAT after only refused recipients (554, as RFC 5321 §3.3 allows and Postfix
   does) are rows there. LMTP's dialect (RFC 2033 §4.1) is :data:`LMTP_VERBS` (applied as
   the command line is read, before its length is judged).
3. **What a reply does**: :data:`TRANSITIONS`. The row for what was answered (a verb, the
   end of the message text, a chunk, a SASL response, the greeting) and the reply code
   gives the next state, what the next bytes are (:class:`Reading`) and which flags change;
   a reply no row names changes nothing and commands are read next. 221 and 421
   (:data:`CLOSING_CODES`) end the session whatever they answer. Some rows follow no
   reply: the TLS handshake (after STARTTLS the session starts over, RFC 3207 §4.2), a
   BDAT line the core accepts (its octets follow at once, RFC 3030 §2; one whose size is
   not a number ends the session), a refusal the core sends itself (commands follow), and
   the application ending a transaction.

Nothing here does I/O or imports anything outside the standard library.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

__all__ = [
    "State",
    "Reading",
    "CommandRule",
    "COMMANDS",
    "Refusal",
    "REFUSALS",
    "OUT_OF_SEQUENCE",
    "CONDITIONS",
    "LMTP_VERBS",
    "LMTP_REFUSAL",
    "Transition",
    "TRANSITIONS",
    "GREETING",
    "MESSAGE_END",
    "CHUNK",
    "LAST_CHUNK",
    "SASL_RESPONSE",
    "TLS_HANDSHAKE",
    "IMPLICIT_TLS",
    "CHUNK_LINE",
    "CHUNK_SIZE_UNKNOWN",
    "CORE_REFUSAL",
    "TRANSACTION_RESET",
    "OK",
    "NOT_OK",
    "ANY_CODE",
    "only",
    "CLOSING_CODES",
    "AFTER_TRANSACTION",
    "ENVELOPE_STATES",
    "REFUSALS_BY_VERB",
    "TRANSITIONS_BY_ANSWER",
    "VerbRules",
    "VERBS",
    "UNCHANGED",
    "refusals",
    "transition",
]


class State(enum.Enum):
    """Where the session is. Transaction states (MAIL, RCPT, DATA) imply a HELO was seen."""

    GREETING = "greeting"  # connected, the application has not greeted yet
    INIT = "init"  # greeted, no HELO/EHLO accepted yet
    READY = "ready"  # HELO/EHLO accepted, no transaction
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # at least one RCPT accepted
    DATA = "data"  # reading message text
    STARTTLS = "starttls"  # 220 to STARTTLS sent: input is discarded until tls_started()
    CLOSED = "closed"  # a closing reply was sent, or the peer went away

    # Members are singletons compared by identity: hash them by identity too, in C.
    # (Enum's own __hash__ is Python code, run on every lookup in the tables below.)
    __hash__ = object.__hash__


class Reading(enum.Enum):
    """What the next bytes from the client are (each has its reader in the session)."""

    NOTHING = "nothing"  # before the greeting, after a 220 to STARTTLS, once closed
    COMMAND = "command"  # a command line
    SASL_RESPONSE = "sasl response"  # the line answering a 334 challenge (RFC 4954 §4)
    MESSAGE_TEXT = "message text"  # after 354, up to CRLF.CRLF
    CHUNK = "chunk"  # the octets of a BDAT chunk (RFC 3030)

    __hash__ = object.__hash__


_SESSION = frozenset({State.INIT, State.READY, State.MAIL, State.RCPT})
_ANY = frozenset(State)
_IN_INIT = frozenset({State.INIT})
_IN_READY = frozenset({State.READY})
_IN_MAIL = frozenset({State.MAIL})
_IN_RCPT = frozenset({State.RCPT})
#: the states of a mail transaction, and where ending it goes: back to READY
AFTER_TRANSACTION = {State.MAIL: State.READY, State.RCPT: State.READY, State.DATA: State.READY}
#: the states where a transaction has an envelope but no message text is being read
ENVELOPE_STATES = frozenset({State.MAIL, State.RCPT})


# -- 1. Which command is legal when --------------------------------------------------------
class CommandRule(NamedTuple):
    """How the core judges one verb before the application sees it."""

    #: the states in which the verb is accepted (unless a REFUSALS row refuses it)
    legal_in: frozenset[State]
    #: RFC 5321 §4.1.1: "none" (501 if one is given), "optional", or "required" (501 without)
    argument: Literal["none", "optional", "required"]
    #: what the argument must start with (case-insensitive); the Command carries the rest
    prefix: str = ""
    #: the 501 text for a missing or malformed argument
    usage: str = ""
    #: a Limits flag that must be on for the verb to be the core's (else it is handed on)
    offered_with: str = ""


COMMANDS: dict[str, CommandRule] = {
    "HELO": CommandRule(_SESSION, "required", usage="5.5.4 Syntax: HELO hostname"),
    "EHLO": CommandRule(_SESSION, "required", usage="5.5.4 Syntax: EHLO hostname"),
    "MAIL": CommandRule(_IN_READY, "required", "FROM:", "5.5.4 Syntax: MAIL FROM:<address>"),
    "RCPT": CommandRule(ENVELOPE_STATES, "required", "TO:", "5.5.4 Syntax: RCPT TO:<address>"),
    "DATA": CommandRule(_IN_RCPT, "none"),
    "BDAT": CommandRule(_IN_RCPT, "required", "", "5.5.4 Syntax: BDAT count [LAST]", "chunking"),
    "RSET": CommandRule(_SESSION, "none"),
    "NOOP": CommandRule(_SESSION, "optional"),
    "QUIT": CommandRule(_SESSION, "none"),
    "VRFY": CommandRule(_SESSION, "required", usage="5.5.4 Syntax: VRFY address"),
    "HELP": CommandRule(_SESSION, "optional"),
    # RFC 3207 §4 and RFC 4954 §4: after EHLO, outside a transaction (REFUSALS: only once).
    "STARTTLS": CommandRule(_IN_READY, "none"),
    "AUTH": CommandRule(
        _IN_READY, "required", usage="5.5.4 Syntax: AUTH mechanism [initial-response]"
    ),
    # Postfix's XCLIENT (a trusted proxy hands over its client's facts): outside a
    # transaction only; whether this client may use it is the command layer's to judge.
    "XCLIENT": CommandRule(
        frozenset({State.INIT, State.READY}),
        "required",
        usage="5.5.4 Syntax: XCLIENT attribute=value ...",
    ),
}

#: In LMTP mode (``Limits.lmtp``, RFC 2033 §4.1): the verb a client's verb is judged (and
#: handed on) as; None: refused with LMTP_REFUSAL, whatever the state.
LMTP_VERBS: dict[str, str | None] = {"LHLO": "EHLO", "HELO": None, "EHLO": None}


# -- 2. Which refusal a command out of place gets -------------------------------------------
class Refusal(NamedTuple):
    """A reply the core sends itself in place of handing a command on."""

    verbs: frozenset[str]
    states: frozenset[State]
    #: a flag of the session that must hold (one of CONDITIONS), or None: always
    when: str | None
    code: int
    #: ``{verb}`` is replaced by the command's verb
    text: str


#: The flags a refusal may depend on: ServerSession attributes, read by name.
CONDITIONS: dict[str, str] = {
    "tls_active": "the session is encrypted (STARTTLS done, or implicit TLS)",
    "authenticated": "a 235 reply to AUTH was sent since the last TLS start",
    "bdat_active": "a BDAT chunk of this transaction was accepted",
    "recipients_refused": "RCPT was tried in this transaction (and, in MAIL, every one refused)",
    "helo_only": "the client greeted with HELO, not EHLO: no extensions",
}


def _row(verbs: str, states: frozenset[State], when: str | None, code: int, text: str) -> Refusal:
    return Refusal(frozenset(verbs.split()), states, when, code, text)


REFUSALS: tuple[Refusal, ...] = (
    # STARTTLS and AUTH: once each, after EHLO, outside a transaction.
    _row("STARTTLS", _ANY, "tls_active", 503, "5.5.1 Error: TLS already active"),
    _row("AUTH", _ANY, "authenticated", 503, "5.5.1 Error: already authenticated"),
    _row("STARTTLS AUTH", ENVELOPE_STATES, None, 503, "5.5.1 Error: MAIL transaction in progress"),
    _row("STARTTLS AUTH", _IN_INIT, None, 503, "5.5.1 Error: send EHLO first"),
    # DATA and BDAT do not mix; no RCPT once a chunk was accepted (RFC 3030 §3).
    _row(
        "DATA RCPT",
        _ANY,
        "bdat_active",
        503,
        "5.5.1 Error: {verb} not allowed during a BDAT transfer",
    ),
    _row("BDAT", _ANY, "helo_only", 503, "5.5.1 Error: send EHLO first"),
    # The transaction's order: HELO, MAIL, RCPT, DATA.
    _row("MAIL RCPT DATA", _IN_INIT, None, 503, "5.5.1 Error: send HELO/EHLO first"),
    _row("MAIL", ENVELOPE_STATES, None, 503, "5.5.1 Error: nested MAIL command"),
    _row("RCPT DATA BDAT", _IN_READY, None, 503, "5.5.1 Error: need MAIL command"),
    # RFC 5321 §3.3 allows 503 or 554 here; 554 says why.
    _row("DATA BDAT", _IN_MAIL, "recipients_refused", 554, "5.5.1 Error: no valid recipients"),
    _row("DATA BDAT", _IN_MAIL, None, 503, "5.5.1 Error: need RCPT command"),
)

#: A command in a state its COMMANDS row does not name, when no row of REFUSALS applies.
OUT_OF_SEQUENCE = _row(" ".join(COMMANDS), _ANY, None, 503, "5.5.1 Error: {verb} not allowed now")
#: HELO or EHLO in LMTP mode (see LMTP_VERBS).
LMTP_REFUSAL = _row("HELO EHLO", _ANY, None, 500, "5.5.1 Error: this is LMTP, use LHLO")


def _compile_refusals() -> dict[str, dict[State, tuple[Refusal, ...]]]:
    table: dict[str, dict[State, tuple[Refusal, ...]]] = {}
    for verb, rule in COMMANDS.items():
        table[verb] = {}
        for state in State:
            rows = [r for r in REFUSALS if verb in r.verbs and state in r.states]
            if state not in rule.legal_in:
                rows.append(OUT_OF_SEQUENCE)
            table[verb][state] = tuple(rows)
    return table


#: verb -> state -> the REFUSALS rows that may apply there, in order (OUT_OF_SEQUENCE last
#: where the verb is not legal): what the session walks for each command.
REFUSALS_BY_VERB = _compile_refusals()


def refusals(verb: str, state: State) -> tuple[Refusal, ...]:
    """The refusals that may answer ``verb`` (a key of COMMANDS) in ``state``, in order.

    The first whose ``when`` is None or holds answers; an empty tuple means accepted.
    """
    return REFUSALS_BY_VERB[verb][state]


# -- 3. What a reply does -------------------------------------------------------------------
#: What ``Transition.answers`` names besides a verb (never a verb: they hold spaces).
GREETING = "the greeting"
MESSAGE_END = "end of message text"
CHUNK = "BDAT chunk"
LAST_CHUNK = "BDAT LAST chunk"
SASL_RESPONSE = "SASL response"
TLS_HANDSHAKE = "TLS handshake after STARTTLS"
IMPLICIT_TLS = "TLS handshake before the greeting"
CHUNK_LINE = "BDAT line accepted by the core"
CHUNK_SIZE_UNKNOWN = "BDAT line without a size"
CORE_REFUSAL = "the core's own refusal"
TRANSACTION_RESET = "reset_transaction() with an envelope"

OK = range(200, 300)
NOT_OK = range(300, 600)
ANY_CODE = range(0, 1000)


def only(code: int) -> range:
    """The codes a row applies to: just this one."""
    return range(code, code + 1)


@dataclass(frozen=True, slots=True)
class Transition:
    """What a reply (with a code in ``codes``) to ``answers`` does to the session.

    Applied in the order of the fields: first the transaction ends, then the state moves,
    then the flags change, then the session reads what ``reads`` names.
    """

    answers: str
    codes: range
    #: the transaction is over: back to READY from MAIL, RCPT or DATA (AFTER_TRANSACTION),
    #: its RCPT count and chunking state forgotten
    ends_transaction: bool = False
    #: the next state; None: it stays
    to: State | None = None
    #: the client may use extensions (EHLO); None: unchanged
    esmtp: bool | None = None
    #: None: unchanged
    authenticated: bool | None = None
    #: None: unchanged
    tls_active: bool | None = None
    #: a chunk of the transaction was accepted: DATA and RCPT are out of place now
    chunking: bool = False
    #: what the next bytes are
    reads: Reading = Reading.COMMAND
    #: everything buffered is dropped, and so is every byte received until a row makes the
    #: session read again: clear text sent after asking for encryption is never
    #: interpreted (CVE-2011-0411)
    drops_input: bool = False
    #: the session ends
    closes: bool = False
    #: the session flags this row sets, as (attribute, value): derived from the fields above
    flags: tuple[tuple[str, bool], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        named = {"esmtp": self.esmtp, "authenticated": self.authenticated}
        named |= {"tls_active": self.tls_active, "bdat_active": self.chunking or None}
        flags = tuple((name, value) for name, value in named.items() if value is not None)
        object.__setattr__(self, "flags", flags)


TRANSITIONS: tuple[Transition, ...] = (
    # A greeting of 400 or more refuses the session (RFC 5321 §3.1): nothing is read.
    Transition(GREETING, range(200, 400), to=State.INIT),
    Transition(GREETING, range(400, 600), reads=Reading.NOTHING, closes=True),
    # HELO/EHLO start over: no transaction (RFC 5321 §4.1.4); only EHLO allows extensions.
    Transition("HELO", OK, to=State.READY, ends_transaction=True, esmtp=False),
    Transition("EHLO", OK, to=State.READY, ends_transaction=True, esmtp=True),
    Transition("MAIL", OK, to=State.MAIL),
    Transition("RCPT", OK, to=State.RCPT),
    Transition("RSET", OK, ends_transaction=True),
    Transition("DATA", only(354), to=State.DATA, reads=Reading.MESSAGE_TEXT),
    Transition(MESSAGE_END, ANY_CODE, ends_transaction=True),
    # BDAT: an accepted chunk keeps the transaction in chunking; LAST ends it, and so does
    # a refused chunk (RFC 3030 §4.2: the client must not send more).
    Transition(CHUNK_LINE, ANY_CODE, reads=Reading.CHUNK),
    # A size that is not a number (501): the octets cannot be told from commands.
    Transition(CHUNK_SIZE_UNKNOWN, ANY_CODE, reads=Reading.NOTHING, closes=True),
    Transition(CHUNK, OK, chunking=True),
    Transition(CHUNK, NOT_OK, ends_transaction=True),
    Transition(LAST_CHUNK, ANY_CODE, ends_transaction=True),
    # STARTTLS: after the 220 nothing is read until the handshake is done; then the
    # session starts over (RFC 3207 §4.2). Implicit TLS only marks the session encrypted.
    Transition("STARTTLS", only(220), to=State.STARTTLS, reads=Reading.NOTHING, drops_input=True),
    Transition(
        TLS_HANDSHAKE,
        ANY_CODE,
        to=State.INIT,
        ends_transaction=True,
        esmtp=False,
        authenticated=False,
        tls_active=True,
    ),
    Transition(IMPLICIT_TLS, ANY_CODE, reads=Reading.NOTHING, tls_active=True),
    # AUTH: 334 makes the next line a SASL response (one line per challenge); 235 ends
    # the exchange authenticated; anything else ends it.
    Transition("AUTH", only(334), reads=Reading.SASL_RESPONSE),
    Transition("AUTH", only(235), authenticated=True),
    Transition(SASL_RESPONSE, only(334), reads=Reading.SASL_RESPONSE),
    Transition(SASL_RESPONSE, only(235), authenticated=True),
    # XCLIENT's 220 is a new greeting: as if its client had just connected, no HELO/EHLO
    # and no AUTH; TLS, a property of the socket, stays.
    Transition(
        "XCLIENT",
        only(220),
        to=State.INIT,
        ends_transaction=True,
        esmtp=False,
        authenticated=False,
    ),
    # A line the core refused itself (a bad command, SASL response or BDAT chunk).
    Transition(CORE_REFUSAL, ANY_CODE),
    # The application ended the transaction without a command (e.g. a plugin did); only
    # while it has an envelope (ENVELOPE_STATES), never while its text is being read.
    Transition(TRANSACTION_RESET, ANY_CODE, ends_transaction=True),
)

#: Replies that end the session after anything they answer (RFC 5321 §3.8, §4.1.1.10).
CLOSING_CODES = frozenset({221, 421})

#: the row applied when no row of TRANSITIONS names the answer and code
UNCHANGED = Transition("anything else", ANY_CODE)


def _compile_transitions() -> dict[str, tuple[Transition, ...]]:
    table: dict[str, list[Transition]] = {}
    for row in TRANSITIONS:
        table.setdefault(row.answers, []).append(row)
    return {answers: tuple(rows) for answers, rows in table.items()}


#: answers -> its rows, in table order: what the session looks up for each reply.
TRANSITIONS_BY_ANSWER = _compile_transitions()


class VerbRules(NamedTuple):
    """What the three tables say about one verb, gathered for one lookup per command."""

    command: CommandRule
    #: state -> the REFUSALS rows that may apply there, in order (REFUSALS_BY_VERB)
    refusals: dict[State, tuple[Refusal, ...]]
    #: the TRANSITIONS rows for a reply to it
    replies: tuple[Transition, ...]


#: verb -> its rules, for every verb of COMMANDS: what the session looks up per command.
VERBS: dict[str, VerbRules] = {
    verb: VerbRules(rule, REFUSALS_BY_VERB[verb], TRANSITIONS_BY_ANSWER.get(verb, ()))
    for verb, rule in COMMANDS.items()
}


def transition(answers: str, code: int) -> Transition:
    """The row for a reply with ``code`` to ``answers`` (UNCHANGED when none names it)."""
    for row in TRANSITIONS_BY_ANSWER.get(answers, ()):
        if code in row.codes:
            return row
    return UNCHANGED
