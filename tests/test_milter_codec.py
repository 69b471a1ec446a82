"""The milter codec and the MTA-side session rules, driven with bytes: no sockets.

Pins: every message kind survives encode/decode both ways and has the exact wire layout
of the protocol; the framing cuts packets at any split of the input; option negotiation
refuses what Postfix refuses; skipped steps are not sent (their macros are), waived
replies are not awaited; body chunks stay within 65535 octets; garbage is refused with
an error that says what was wrong.
"""

from __future__ import annotations

import struct

import pytest

from qpconn.milter import codec
from qpconn.milter.codec import Actions, MilterProtocolError, PacketReader, Stage, Steps
from qpconn.milter.session import DEFAULT_MACROS, OFFERED_STEPS, PROGRESS, Answer, MilterSession

COMMANDS = [
    codec.OptionNegotiation(6, Actions.ALL, OFFERED_STEPS),
    codec.DefineMacros(b"C", (("j", "mx.test"), ("{client_addr}", "127.0.0.2"))),
    codec.DefineMacros(b"E", ()),
    codec.Connect("client.test", b"4", 40000, "192.0.2.1"),
    codec.Connect("[2001:db8::1]", b"6", 25, "2001:db8::1"),
    codec.Connect("localhost", b"L", 0, "/run/socket"),
    codec.Connect("unknown", b"U"),
    codec.Helo("client.test"),
    codec.Mail(("<a@example.org>", "SIZE=100", "BODY=8BITMIME")),
    codec.Mail(("<>",)),
    codec.Rcpt(("<u@mx.test>", "NOTIFY=NEVER")),
    codec.Data(),
    codec.HeaderField("Subject", "caf\udce9 in Latin-1, caf\u00e9 in UTF-8"),
    codec.HeaderField("X-Folded", "one\n\ttwo"),
    codec.EndOfHeaders(),
    codec.BodyChunk(b"line\r\n" * 10),
    codec.EndOfMessage(),
    codec.Abort(),
    codec.Quit(),
    codec.QuitNewConnection(),
    codec.Unknown("XYZZY arg"),
]
REPLIES = [
    codec.OptionNegotiation(6, Actions.ADD_HEADERS, Steps.NO_HELO, ((Stage.EOM, "i {x}"),)),
    codec.Continue(), codec.Accept(), codec.Reject(), codec.Tempfail(), codec.Discard(),
    codec.Progress(), codec.Skip(), codec.Shutdown(), codec.ConnectionFailure(),
    codec.ReplyCode("554 5.7.1 Spam message rejected"),
    codec.ReplyCode("451-4.7.1 first line\r\n451 4.7.1 last line"),
    codec.Quarantine("looks bad"),
    codec.AddHeader("X-Spam", "Yes"),
    codec.InsertHeader(0, "DKIM-Signature", "v=1; a=rsa-sha256;\n\tb=abc"),
    codec.ChangeHeader(2, "Subject", ""),
    codec.ReplaceBody(b"new body\r\n"),
    codec.AddRecipient("<new@example.org>"),
    codec.AddRecipientWithArgs("<new@example.org>", "NOTIFY=NEVER"),
    codec.DeleteRecipient("<old@example.org>"),
    codec.ChangeSender("<bounce@example.org>"),
    codec.ChangeSender("<bounce@example.org>", "SIZE=10"),
]  # fmt: skip


def one_packet(data: bytes) -> tuple[bytes, bytes]:
    reader = PacketReader()
    reader.feed(data)
    (packet,) = list(reader.packets())
    assert reader.pending == 0
    return packet


@pytest.mark.parametrize("message", COMMANDS, ids=repr)
def test_every_command_round_trips(message):
    code, data = one_packet(message.encode())
    assert code == message.code
    assert codec.decode_command(code, data) == message


@pytest.mark.parametrize("message", REPLIES, ids=repr)
def test_every_reply_round_trips(message):
    code, data = one_packet(message.encode())
    assert codec.decode_reply(code, data) == message


def test_wire_layout_is_the_protocols():
    assert codec.OptionNegotiation(6, 0x1FF, 0x10).encode() == (
        b"\x00\x00\x00\x0dO" + b"\x00\x00\x00\x06\x00\x00\x01\xff\x00\x00\x00\x10"
    )
    assert codec.Connect("h", b"4", 25, "1.2.3.4").encode() == (
        b"\x00\x00\x00\x0eCh\x004\x00\x191.2.3.4\x00"
    )
    assert codec.DefineMacros(b"M", (("i", "q1"),)).encode() == b"\x00\x00\x00\x07DMi\x00q1\x00"
    assert codec.Mail(("<a@b>", "SIZE=1")).encode() == b"\x00\x00\x00\x0eM<a@b>\x00SIZE=1\x00"
    assert (
        codec.InsertHeader(1, "X", "y").encode() == b"\x00\x00\x00\x09i\x00\x00\x00\x01X\x00y\x00"
    )
    assert codec.EndOfMessage().encode() == b"\x00\x00\x00\x01E"
    assert codec.ReplyCode("550 5.7.1 no").encode() == b"\x00\x00\x00\x0ey550 5.7.1 no\x00"


def test_framing_survives_every_split():
    stream = b"".join(message.encode() for message in REPLIES)
    for size in (1, 2, 3, 5, 7, 64):
        reader = PacketReader()
        seen = []
        for start in range(0, len(stream), size):
            reader.feed(stream[start : start + size])
            seen.extend(codec.decode_reply(code, data) for code, data in reader.packets())
        assert seen == REPLIES, size


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x00\x00\x00\x00", "bad packet length 0"),
        (b"\x7f\xff\xff\xff", "bad packet length 2147483647"),
        (b"\x00\x00\x00\x02y5", "string without its NUL"),
        (b"\x00\x00\x00\x05Zabcd", "unknown milter reply b'Z'"),
        (b"\x00\x00\x00\x03cxx", "2 octets left over"),
        (b"\x00\x00\x00\x03i\x00\x00", "too short for a 32-bit number"),
        (b"\x00\x00\x00\x0ay200 fine\x00", "not a 4xx/5xx SMTP reply"),
        (b"\x00\x00\x00\x0cy550-no end\x00", "not a 4xx/5xx SMTP reply"),
        (b"\x00\x00\x00\x0cy550 5.7.1\x00\x00", "1 octets left over"),
        (b"\x00\x00\x00\x03h\x00x", "string without its NUL"),
    ],
)
def test_garbage_is_refused_with_a_clear_error(data, error):
    reader = PacketReader()
    reader.feed(data)
    with pytest.raises(MilterProtocolError, match=error.replace("(", r"\(").replace("[", r"\[")):
        for code, payload in reader.packets():
            codec.decode_reply(code, payload)


def test_a_huge_length_is_refused_before_it_is_buffered():
    reader = PacketReader(limit=1000)
    reader.feed(struct.pack("!I", 1001))
    with pytest.raises(MilterProtocolError, match="1 to 1000"):
        list(reader.packets())


def test_unknown_command_and_address_family_refused():
    with pytest.raises(MilterProtocolError, match="unknown MTA command"):
        codec.decode_command(b"z", b"")
    with pytest.raises(MilterProtocolError, match="address family"):
        codec.decode_command(b"C", b"h\x00X\x00\x00a\x00")
    with pytest.raises(ValueError, match="NUL"):
        codec.Helo("a\0b").encode()
    with pytest.raises(ValueError, match="65535"):
        codec.BodyChunk(b"x" * 65536).encode()


# -- the session ----------------------------------------------------------------------------
def negotiated(protocol: int = 0, actions: int = Actions.ALL, macros=()) -> MilterSession:
    session = MilterSession()
    code, data = one_packet(session.negotiation())
    assert codec.decode_command(code, data) == codec.OptionNegotiation(
        6, Actions.ALL, OFFERED_STEPS
    )
    session.negotiated(codec.OptionNegotiation(6, actions, protocol, macros))
    return session


def sent(data: bytes) -> list[codec.Message]:
    reader = PacketReader()
    reader.feed(data)
    return [codec.decode_command(code, payload) for code, payload in reader.packets()]


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (codec.OptionNegotiation(7, 0, 0), "protocol version 7"),
        (codec.OptionNegotiation(1, 0, 0), "protocol version 1"),
        (codec.OptionNegotiation(6, 0x400, 0), "actions 0x400 beyond"),
        (codec.Continue(), "instead of option negotiation"),
    ],
)
def test_negotiation_refuses_what_postfix_refuses(reply, error):
    session = MilterSession()
    session.negotiation()
    with pytest.raises(MilterProtocolError, match=error):
        session.negotiated(reply)


def test_skipped_steps_are_not_sent_but_their_macros_are():
    session = negotiated(Steps.NO_HELO | Steps.NO_RCPT)
    data, wait = session.command(codec.Helo("x"), {"{tls_version}": "TLSv1.3"})
    assert (sent(data), wait) == (
        [codec.DefineMacros(b"H", (("{tls_version}", "TLSv1.3"),))],
        False,
    )
    data, wait = session.command(codec.Rcpt(("<u@x>",)), {"i": "q1", "{rcpt_addr}": "u@x"})
    assert sent(data) == [codec.DefineMacros(b"R", (("i", "q1"), ("{rcpt_addr}", "u@x")))]
    assert not wait
    data, wait = session.command(codec.Mail(("<a@b>",)), {"i": "q1", "{auth_authen}": None})
    assert sent(data) == [codec.DefineMacros(b"M", (("i", "q1"),)), codec.Mail(("<a@b>",))]
    assert wait and session.waiting


def test_waived_replies_are_not_awaited():
    session = negotiated(Steps.NR_HEADER | Steps.NR_CONNECT)
    data, wait = session.command(codec.HeaderField("A", "b"))
    assert sent(data) == [codec.HeaderField("A", "b")] and not wait
    _, wait = session.command(codec.Connect("h", b"U"))
    assert not wait
    _, wait = session.command(codec.EndOfHeaders())
    assert wait
    assert session.receive(codec.Continue()) == Answer(codec.Continue())
    for message in (codec.Abort(), codec.Quit()):
        assert session.command(message) == (message.encode(), False)


def test_the_milters_own_macro_lists_replace_the_defaults():
    session = negotiated(macros=((Stage.CONNECT, "{client_addr} j"), (42, "ignored")))
    data, _ = session.command(codec.Connect("h", b"U"), {"j": "mx", "{client_addr}": "1.2.3.4",
                                                         "v": "qpconn"})  # fmt: skip
    assert sent(data)[0] == codec.DefineMacros(b"C", (("{client_addr}", "1.2.3.4"), ("j", "mx")))
    assert session.macro_names[Stage.RCPT] == DEFAULT_MACROS[Stage.RCPT]


def test_end_of_message_collects_changes_then_the_decision():
    session = negotiated()
    session.command(codec.EndOfMessage())
    edits = [codec.AddHeader("X-A", "1"), codec.ReplaceBody(b"x"), codec.ChangeSender("<a@b>")]
    assert session.receive(codec.Progress()) == PROGRESS
    for edit in edits:
        assert session.receive(edit) is None
    assert session.receive(codec.Quarantine("why")) is None
    answer = session.receive(codec.Accept())
    assert answer == Answer(codec.Accept(), tuple(edits), "why")
    assert not session.waiting


def test_changes_outside_the_end_of_message_or_not_negotiated_are_refused():
    session = negotiated(actions=Actions.ADD_HEADERS)
    session.command(codec.Rcpt(("<u@x>",)))
    with pytest.raises(MilterProtocolError, match="only at the end of the message"):
        session.receive(codec.AddHeader("X", "y"))
    session = negotiated(actions=Actions.ADD_HEADERS)
    session.command(codec.EndOfMessage())
    with pytest.raises(MilterProtocolError, match="without negotiating action 0x2"):
        session.receive(codec.ReplaceBody(b"x"))
    with pytest.raises(MilterProtocolError, match="when no reply was due"):
        negotiated().receive(codec.Continue())


def test_skip_stops_the_body_until_the_next_message():
    session = negotiated()
    session.command(codec.BodyChunk(b"a"))
    assert session.receive(codec.Skip()) == Answer(codec.Continue())
    assert session.command(codec.BodyChunk(b"b")) == (b"", False)
    session.command(codec.EndOfMessage())
    session.receive(codec.Accept())
    assert session.wants(codec.BodyChunk)


def test_discard_before_a_message_exists_goes_on():
    session = negotiated()
    session.command(codec.Helo("h"))
    assert session.receive(codec.Discard()) == Answer(codec.Continue())


def test_old_milters_get_no_data_step():
    session = MilterSession()
    session.negotiation()
    session.negotiated(codec.OptionNegotiation(2, 0, 0))
    assert session.command(codec.Data()) == (b"", False)


# -- the changes, on a Transaction ----------------------------------------------------------
def test_changes_apply_to_a_spooled_transaction_and_remove_its_old_spool(tmp_path):
    from qpconn.mail.connection import Connection
    from qpconn.mail.transaction import Transaction
    from qpconn.milter.edits import apply_edits

    txn = Transaction(Connection(), size_threshold=10, spool_dir=str(tmp_path))
    txn.body_write(b"Subject: a\r\nX-Two: 1\r\nX-Two: 2\r\n\r\n" + b"old body line\r\n" * 10)
    txn.end_of_data()
    old_spool = txn.spool_path
    assert old_spool is not None
    done = apply_edits(txn, [codec.ChangeHeader(2, "X-Two", "second"),
                             codec.ChangeHeader(1, "X-Two", ""),
                             codec.ReplaceBody(b"new\n" * 5)])  # fmt: skip
    assert done == ["change header X-Two", "delete header X-Two", "replace body (25 octets)"]
    assert txn.header.as_bytes() == b"Subject: a\r\nX-Two: second\r\n"
    assert txn.body_bytes() == b"new\r\n" * 5
    assert not (tmp_path / old_spool).exists() and txn.spool_path != old_spool
    txn.close()


def test_a_change_that_cannot_be_made_changes_nothing():
    from qpconn.mail.connection import Connection
    from qpconn.mail.transaction import Transaction
    from qpconn.milter.edits import apply_edits

    txn = Transaction(Connection())
    txn.body_write(b"Subject: a\r\n\r\nbody\r\n")
    txn.end_of_data()
    for bad in (codec.AddHeader("X", "one\ntwo"), codec.AddHeader("Bad:Name", "x"),
                codec.AddRecipient("<not an address>")):  # fmt: skip
        with pytest.raises(MilterProtocolError):
            apply_edits(txn, [codec.AddHeader("X-First", "fine"), bad])
        assert txn.header.as_bytes() == b"Subject: a\r\n" and txn.recipients == []
