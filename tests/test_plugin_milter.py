"""The milter plugin end to end: a real qpconn, a real SMTP client, and a scripted milter of
our own on loopback (tests/support/milterpeer.py) that answers as each test says, or
breaks the protocol on purpose.

Pins: the steps and macros a milter gets, in order; what each answer does to the SMTP
session (reject, tempfail, reply codes, accept, discard, shutdown, quarantine); the
end-of-message changes applied before the queue; skipped steps and waived replies;
several milters in order; and default_action when a milter is down, hangs, talks
garbage or hangs up.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.app.metrics import ServerMetrics
from qpconn.config import Config
from qpconn.milter import codec
from qpconn.milter.codec import Steps
from qpconn.plugins import Plugin, PluginLoadError, load_plugin
from tests.e2e_client import logged_events, watch_errors
from tests.support.milterpeer import MilterPeer
from tests.support.policy import codes, script
from tests.support.process import free_port
from tests.support.server import in_thread

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\nX-Remove: me\r\n\r\nhello"
SEND = ["EHLO client.test", "MAIL FROM:<a@example.org> SIZE=100", "RCPT TO:<u@mx.test>", "DATA"]


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture
def milter_events() -> Iterator[list[dict[str, Any]]]:
    with logged_events("milter") as found:
        yield found


@pytest.fixture
def peers() -> Iterator[Any]:
    started: list[MilterPeer] = []

    def start(*args: Any, **kwargs: Any) -> MilterPeer:
        peer = MilterPeer(*args, **kwargs)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        pytest_twisted.blockon(peer.stop())


class Envelope(Plugin):
    """Keeps the envelope as the queue sees it."""

    def register(self) -> None:
        self.seen: list[tuple[str, list[tuple[str, dict[str, Any]]], dict[str, Any]]] = []

    def hook_queue_pre(self, transaction: Any) -> None:
        rcpts = [(r.address, dict(r.params)) for r in transaction.recipients]
        self.seen.append((transaction.sender.format(), rcpts, dict(transaction.mail_params)))


def start(qpconn_server: Any, line: str, **files: str) -> Any:
    envelope = Envelope(Config(None), "envelope")
    plugins = ["relay", line, "rcpt_ok", envelope, "queue/maildir maildir"]
    server = qpconn_server(plugins=plugins, files=files)
    server.extra["envelope"] = envelope
    return server


async def talk(
    server: Any, commands: list[Any], *peers: MilterPeer, source: str = "127.0.0.2"
) -> list[Any]:
    """Run one SMTP session; return its replies once it and the milter connections of
    ``peers`` are closed."""
    replies = await in_thread(script, server.address, source, commands)
    await server.wait_sessions_closed()
    for peer in peers:
        await peer.wait_closed()
    return replies


def body_of(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[1]


@pytest_twisted.ensureDeferred
async def test_every_step_and_its_macros_reach_the_milter(qpconn_server, peers, milter_events):
    peer = peers()
    server = start(qpconn_server, f"milter {peer.address}")
    replies = await talk(server, [*SEND, MESSAGE], peer)
    assert codes(replies) == [220, 250, 250, 250, 354, 250]
    assert [m for m in server.messages() if b"\nSubject: hello\n" in m]
    fields = [c for c in peer.commands() if isinstance(c, codec.HeaderField)]
    assert peer.steps() == [
        "OptionNegotiation", "Connect", "Helo", "Mail", "Rcpt", "Data",
        *["HeaderField"] * len(fields), "EndOfHeaders", "BodyChunk", "EndOfMessage", "Abort",
        "Quit",
    ]  # fmt: skip
    commands = peer.commands()
    connect = next(c for c in commands if isinstance(c, codec.Connect))
    assert (connect.hostname, connect.family, connect.address) == ("[127.0.0.2]", b"4", "127.0.0.2")
    assert next(c for c in commands if isinstance(c, codec.Helo)) == codec.Helo("client.test")
    mail = next(c for c in commands if isinstance(c, codec.Mail))
    assert mail.args == ("<a@example.org>", "SIZE=100")
    assert next(c for c in commands if isinstance(c, codec.Rcpt)).args == ("<u@mx.test>",)
    # our Received on top, folds as LF + white space, the one space after the colon eaten
    assert fields[0].name == "Received" and fields[0].value.startswith("from client.test")
    assert "\n\t" in fields[0].value and "\r" not in fields[0].value
    assert fields[1:] == [codec.HeaderField("From", "a@example.org"),
                          codec.HeaderField("Subject", "hello"),
                          codec.HeaderField("X-Remove", "me")]  # fmt: skip
    assert next(c for c in commands if isinstance(c, codec.BodyChunk)).data == b"hello\r\n"
    connect_macros = peer.macros_for(b"C")
    assert connect_macros["j"] == "mx.test" and connect_macros["{daemon_name}"] == "mx.test"
    assert connect_macros["{client_addr}"] == "127.0.0.2"
    assert connect_macros["{client_name}"] == connect_macros["{client_ptr}"] == "unknown"
    assert connect_macros["_"] == "unknown [127.0.0.2]"
    assert connect_macros["v"].startswith("qpconn ")
    assert int(connect_macros["{client_port}"]) > 0
    queue_id = peer.macros_for(b"M")["i"]
    assert peer.macros_for(b"M")["{mail_addr}"] == "a@example.org"
    assert peer.macros_for(b"M")["{mail_host}"] == "example.org"
    assert "{auth_authen}" not in peer.macros_for(b"M")  # not authenticated: not sent at all
    rcpt = peer.macros_for(b"R")
    assert (rcpt["{rcpt_addr}"], rcpt["{rcpt_mailer}"], rcpt["i"]) == (
        "u@mx.test",
        "local",
        queue_id,
    )
    assert (
        peer.macros_for(b"E") == {"i": queue_id} == peer.macros_for(b"T") == peer.macros_for(b"N")
    )
    assert [(e["stage"], e["verdict"]) for e in milter_events] == [("data_post", "accept")]


@pytest_twisted.ensureDeferred
async def test_a_large_spooled_body_goes_in_chunks_of_at_most_65535(qpconn_server, peers):
    peer = peers()
    server = start(qpconn_server, f"milter {peer.address}", size_threshold="1000")
    body = b"".join(b"line %06d of a long message\r\n" % n for n in range(8000))
    replies = await talk(server, [*SEND, b"Subject: big\r\n\r\n" + body[:-2]])
    assert replies[-1].code == 250
    chunks = [c.data for c in peer.commands() if isinstance(c, codec.BodyChunk)]
    assert len(chunks) >= 4 and max(map(len, chunks)) <= 65535
    assert b"".join(chunks) == body


@pytest_twisted.ensureDeferred
async def test_a_recipient_the_milter_refuses_is_refused_alone(qpconn_server, peers):
    def rcpt(command: codec.Message) -> list[Any]:
        if "bad" in command.args[0]:
            return [codec.ReplyCode("550 5.1.1 <bad@mx.test>: no such user")]
        return [codec.Continue()]

    peer = peers({"Rcpt": rcpt})
    server = start(qpconn_server, f"milter {peer.address}")
    replies = await talk(server, [*SEND[:2], "RCPT TO:<bad@mx.test>", "RCPT TO:<u@mx.test>",
                                  "DATA", MESSAGE])  # fmt: skip
    assert codes(replies) == [220, 250, 250, 550, 250, 354, 250]
    assert replies[3].text == "5.1.1 <bad@mx.test>: no such user"
    assert server.extra["envelope"].seen[0][1] == [("u@mx.test", {})]


@pytest_twisted.ensureDeferred
async def test_tempfail_and_reject_map_to_4xx_and_5xx(qpconn_server, peers):
    peer = peers({"Mail": [codec.Tempfail()], "Data": [codec.Reject()]})
    server = start(qpconn_server, f"milter {peer.address}")
    replies = await talk(server, SEND)
    assert codes(replies)[:3] == [220, 250, 450]
    assert replies[2].text == "4.7.1 Service unavailable - try again later"
    peer.replies["Mail"] = [codec.Continue()]
    replies = await talk(server, [*SEND, MESSAGE])
    assert codes(replies) == [220, 250, 250, 250, 554]
    assert replies[4].text == "5.7.1 Command rejected"


@pytest_twisted.ensureDeferred
async def test_a_refusal_at_helo_holds_for_the_whole_session(qpconn_server, peers):
    peer = peers({"Helo": [codec.ReplyCode("550 5.7.1 go away")]})
    server = start(qpconn_server, f"milter {peer.address}")
    replies = await talk(server, ["EHLO client.test", "HELO client.test"])
    assert codes(replies) == [220, 550, 550]
    assert replies[1].text == replies[2].text == "5.7.1 go away"
    assert "Mail" not in peer.steps()


@pytest_twisted.ensureDeferred
async def test_a_multiline_reply_at_the_end_of_the_message(qpconn_server, peers):
    reply = codec.ReplyCode("554-5.7.1 Spam message rejected\r\n554 5.7.1 see the log")
    peer = peers({"EndOfMessage": [reply]})
    server = start(qpconn_server, f"milter {peer.address}")
    replies = await talk(server, [*SEND, MESSAGE])
    assert replies[-1].code == 552
    assert replies[-1].lines == ("5.7.1 Spam message rejected", "5.7.1 see the log")
    assert server.messages() == []


@pytest_twisted.ensureDeferred
async def test_discard_accepts_and_drops_the_message(qpconn_server, peers, milter_events):
    peer = peers({"Rcpt": [codec.Discard()]})
    server = start(qpconn_server, f"milter {peer.address}")
    replies = await talk(server, [*SEND, MESSAGE])
    assert codes(replies) == [220, 250, 250, 250, 354, 250]
    assert server.messages() == []  # queue_pre ran; the milter plugin's queue hook said OK
    assert "HeaderField" not in peer.steps() and "Data" not in peer.steps()
    assert [(e["stage"], e["verdict"]) for e in milter_events] == [("rcpt", "discard")]


@pytest_twisted.ensureDeferred
async def test_end_of_message_changes_are_applied_before_the_queue(qpconn_server, peers):
    edits = [
        codec.AddHeader("X-Added", "yes"),
        codec.InsertHeader(0, "X-Top", "first\n\tfolded"),
        codec.ChangeHeader(1, "Subject", "changed"),
        codec.ChangeHeader(1, "X-Remove", ""),
        codec.ChangeHeader(3, "X-New", "added by change"),
        codec.ReplaceBody(b"new body\n"),
        codec.ReplaceBody(b"second line\r\n"),
        codec.AddRecipient("<extra@mx.test>"),
        codec.AddRecipientWithArgs("<other@mx.test>", "NOTIFY=NEVER"),
        codec.DeleteRecipient("<u@mx.test>"),
        codec.ChangeSender("<bounce@example.org>"),
        codec.Accept(),
    ]
    peer = peers({"EndOfMessage": edits})
    server = start(qpconn_server, f"milter {peer.address}")
    assert (await talk(server, [*SEND, MESSAGE]))[-1].code == 250
    (message,) = server.messages()
    head, body = message.split(b"\n\n", 1)  # the Maildir stores LF line endings
    assert body == b"new body\nsecond line\n"
    fields = head.split(b"\n")
    assert fields.index(b"X-Top: first") < fields.index(b"\tfolded") < next(
        i for i, f in enumerate(fields) if f.startswith(b"Received:"))  # fmt: skip
    assert b"Subject: changed" in fields and b"X-Remove: me" not in fields
    assert fields[-2:] == [b"X-Added: yes", b"X-New: added by change"]
    ((sender, rcpts, params),) = server.extra["envelope"].seen
    assert sender == "<bounce@example.org>" and params == {"SIZE": "100"}
    assert rcpts == [("extra@mx.test", {}), ("other@mx.test", {"NOTIFY": "NEVER"})]


@pytest_twisted.ensureDeferred
async def test_quarantine_adds_a_field_and_a_note(qpconn_server, peers):
    peer = peers({"EndOfMessage": [codec.Quarantine("suspicious\r\nattachment"), codec.Continue()]})
    server = start(qpconn_server, f"milter {peer.address}")
    assert (await talk(server, [*SEND, MESSAGE]))[-1].code == 250
    (message,) = server.messages()
    wanted = f"X-Milter-Quarantine: suspicious??attachment ({peer.address})".encode()
    assert wanted in message.split(b"\n")


@pytest_twisted.ensureDeferred
async def test_accept_at_connect_asks_nothing_more_this_session(qpconn_server, peers):
    peer = peers({"Connect": [codec.Accept()]})
    server = start(qpconn_server, f"milter {peer.address}")
    assert (await talk(server, [*SEND, MESSAGE], peer))[-1].code == 250
    assert peer.steps() == ["OptionNegotiation", "Connect", "Quit"]


@pytest_twisted.ensureDeferred
async def test_accept_at_rcpt_asks_nothing_more_about_this_message(qpconn_server, peers):
    peer = peers({"Rcpt": [codec.Accept()]})
    server = start(qpconn_server, f"milter {peer.address}")
    commands = [*SEND, MESSAGE, "MAIL FROM:<b@example.org>", "RCPT TO:<u@mx.test>"]
    assert codes(await talk(server, commands, peer))[-3:] == [250, 250, 250]
    assert peer.steps() == ["OptionNegotiation", "Connect", "Helo", "Mail", "Rcpt", "Abort",
                            "Mail", "Rcpt", "Quit"]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_skipped_steps_are_not_sent_and_waived_replies_not_awaited(qpconn_server, peers):
    protocol = Steps.NO_HELO | Steps.NO_RCPT | Steps.NR_HEADER | Steps.NO_BODY | Steps.NR_MAIL
    peer = peers(protocol=protocol)
    server = start(qpconn_server, f"milter {peer.address}")
    assert (await talk(server, [*SEND, MESSAGE]))[-1].code == 250
    steps = peer.steps()
    assert "Helo" not in steps and "Rcpt" not in steps and "BodyChunk" not in steps
    assert steps.count("HeaderField") == 4 and "EndOfMessage" in steps
    assert peer.macros_for(b"R")["{rcpt_addr}"] == "u@mx.test"  # the macros still go


@pytest_twisted.ensureDeferred
async def test_rset_sends_abort(qpconn_server, peers):
    peer = peers()
    server = start(qpconn_server, f"milter {peer.address}")
    commands = [*SEND[:3], "RSET", *SEND[1:], MESSAGE]
    assert codes(await talk(server, commands))[-2:] == [354, 250]
    assert peer.steps()[:8] == ["OptionNegotiation", "Connect", "Helo", "Mail", "Rcpt", "Abort",
                                "Mail", "Rcpt"]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_milters_of_one_line_are_asked_in_order(qpconn_server, peers):
    first = peers({"EndOfMessage": [codec.AddHeader("X-First", "1"), codec.Continue()]})
    second = peers({"EndOfMessage": [codec.AddHeader("X-Second", "2"), codec.Accept()]})
    server = start(qpconn_server, f"milter {first.address} {second.address}")
    assert (await talk(server, [*SEND, MESSAGE]))[-1].code == 250
    assert codec.HeaderField("X-First", "1") in second.commands()  # the first one's change
    (message,) = server.messages()
    assert message.split(b"\n\n")[0].endswith(b"X-First: 1\nX-Second: 2")
    first.replies["Mail"] = [codec.Reject()]
    replies = await talk(server, SEND[:2])
    assert replies[-1].code == 550 and "Mail" not in second.steps()


@pytest_twisted.ensureDeferred
async def test_progress_keeps_a_slow_milter_within_its_timeout(qpconn_server, peers):
    # 4 s of work in all, with a progress packet every 0.2 s: more than the 2.5 s the
    # timeout allows without them, far less than it between two of them
    slow = [item for _ in range(20) for item in (0.2, codec.Progress())] + [codec.Accept()]
    peer = peers({"EndOfMessage": slow})
    server = start(qpconn_server, f"milter {peer.address} content_timeout 2.5")
    assert (await talk(server, [*SEND, MESSAGE]))[-1].code == 250


@pytest_twisted.ensureDeferred
async def test_shutdown_closes_the_session_with_421(qpconn_server, peers):
    peer = peers({"Mail": [codec.Shutdown()]})
    server = start(qpconn_server, f"milter {peer.address}")
    replies = await talk(server, SEND)
    assert codes(replies) == [220, 250, 421]


@pytest_twisted.ensureDeferred
async def test_metrics_count_each_verdict(qpconn_server, peers):
    peer = peers({"Rcpt": [codec.Reject()]})
    server = start(qpconn_server, f"milter {peer.address}")
    metrics = ServerMetrics(server.factory).attach()
    try:
        await talk(server, SEND)
    finally:
        metrics.detach()
    line = (f'qpconn_milter_verdicts_total{{milter="{peer.address}",stage="rcpt",'
            f'verdict="reject"}} 1.0')  # fmt: skip
    assert line in metrics.exposition().decode()


# -- when a milter cannot be used: default_action -----------------------------------------
FAILURES = [
    ({"mode": "garbage"}, "connect"),
    ({"mode": "bad_negotiation"}, "connect"),
    ({"mode": "unsolicited"}, "helo"),
    ({"mode": "hang", "hang_on": "Rcpt"}, "rcpt"),
    ({"mode": "hang", "hang_on": "EndOfMessage"}, "data_post"),
    ({"mode": "close", "hang_on": "BodyChunk"}, "data_post"),
    ({"replies": {"EndOfMessage": [codec.ReplaceBody(b"x"), codec.Accept()]},
      "actions": codec.Actions.ADD_HEADERS}, "data_post"),
    ({"replies": {"Mail": [codec.AddHeader("X", "too early")]}}, "mail"),
    ({"replies": {"EndOfMessage": [codec.AddHeader("Bad Name", "x"), codec.Accept()]}},
     "data_post"),
]  # fmt: skip
#: where in the replies to [*SEND, MESSAGE] each stage answers, and with what code
TEMPFAIL_AT = {"connect": (0, 450), "helo": (1, 450), "mail": (2, 450), "rcpt": (3, 450),
               "data_post": (5, 452)}  # fmt: skip


@pytest.mark.parametrize(("broken", "stage"), FAILURES, ids=lambda v: repr(v)[:50])
@pytest_twisted.ensureDeferred
async def test_a_broken_milter_tempfails_by_default(qpconn_server, peers, milter_events,
                                                   broken, stage):  # fmt: skip
    kwargs = dict(broken)
    peer = peers(kwargs.pop("replies", None), **kwargs)
    server = start(qpconn_server, f"milter {peer.address} content_timeout 1 command_timeout 1")
    replies = await talk(server, [*SEND, MESSAGE])
    index, code = TEMPFAIL_AT[stage]
    assert (replies[index].code, replies[index].text) == (
        code, "4.7.1 Service unavailable - try again later"), replies  # fmt: skip
    assert server.messages() == []
    (failure,) = [e for e in milter_events if e["verdict"] == "error"]
    assert failure["stage"] == stage and failure["why"]


@pytest.mark.parametrize(("broken", "stage"), FAILURES, ids=lambda v: repr(v)[:50])
@pytest_twisted.ensureDeferred
async def test_a_broken_milter_is_ignored_with_default_action_accept(qpconn_server, peers,
                                                                     broken, stage):  # fmt: skip
    kwargs = dict(broken)
    peer = peers(kwargs.pop("replies", None), **kwargs)
    line = f"milter {peer.address} default_action accept content_timeout 1 command_timeout 1"
    server = start(qpconn_server, line)
    replies = await talk(server, [*SEND, MESSAGE, *SEND[1:], MESSAGE])
    assert [r for r in replies if r.code >= 400] == []
    assert codes(replies)[-5:] == [250, 250, 250, 354, 250]
    assert len(server.messages()) == 2


@pytest_twisted.ensureDeferred
async def test_a_milter_that_is_down(qpconn_server):
    address = f"inet:127.0.0.1:{free_port()}"
    server = start(qpconn_server, f"milter {address} connect_timeout 2")
    replies = await talk(server, SEND)
    assert [(r.code, r.text) for r in replies] == [
        (450, "4.7.1 Service unavailable - try again later")]  # fmt: skip
    server = start(qpconn_server, f"milter {address} default_action accept",
                   milter_connect_timeout="2")  # fmt: skip
    assert (await talk(server, [*SEND, MESSAGE]))[-1].code == 250


@pytest_twisted.ensureDeferred
async def test_a_failure_holds_for_the_rest_of_the_session(qpconn_server, peers):
    peer = peers(mode="close", hang_on="BodyChunk")
    server = start(qpconn_server, f"milter {peer.address}")
    replies = await talk(server, [*SEND, MESSAGE, "MAIL FROM:<b@example.org>"])
    assert codes(replies)[-2:] == [452, 450]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("milter", "at least one inet:HOST:PORT"),
        ("milter inet:127.0.0.1", "expected inet:HOST:PORT"),
        ("milter inet:127.0.0.1:99999", "out of range"),
        ("milter tcp:127.0.0.1:25", "at least one"),
        ("milter inet:127.0.0.1:25 default_action reject", "default_action must be one of"),
        ("milter inet:127.0.0.1:25 command_timeout 0", "above 0"),
        ("milter inet:127.0.0.1:25 color red", "unknown argument"),
    ],
)
def test_bad_lines_stop_the_start(line, error):
    with pytest.raises(PluginLoadError, match=error):
        load_plugin(Config(None), *line.split())


def test_addresses_in_postfix_and_sendmail_forms():
    from qpconn.milter.client import parse_address

    assert parse_address("inet:localhost:11332") == ("inet", "localhost", 11332)
    assert parse_address("inet:11332@127.0.0.1") == ("inet", "127.0.0.1", 11332)
    assert parse_address("inet:[::1]:8891") == ("inet6", "::1", 8891)
    assert parse_address("inet6:8891@::1") == ("inet6", "::1", 8891)
    assert parse_address("unix:/run/opendkim/opendkim.sock") == (
        "unix", "/run/opendkim/opendkim.sock", 0)  # fmt: skip
    assert parse_address("local:/x.sock") == ("unix", "/x.sock", 0)
