"""rcpt_verify: the next hop's verdict on each recipient, given at RCPT time.

Against real next hops: a private Postfix (unknown local user: 550 5.1.1) behind
``queue/smtp-forward``, and a private Dovecot LMTP (a passwd-file user database) behind
``queue/lmtp``; the cache, the failure policy and the connection reuse against aiosmtpd
as the next hop, and a socket that never answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from qpconn.app.metrics import ServerMetrics
from qpconn.client.verify import MAX_REFUSALS
from qpconn.config import Config
from qpconn.kit.ttlcache import TTLCache
from qpconn.plugins import Plugin, PluginLoadError, load_plugin
from tests.e2e_client import Client, watch_errors
from tests.support.docs import plugins_example
from tests.support.dovecot import private_dovecot
from tests.support.nexthop import Recorder, ScriptedServer, aiosmtpd_next_hop
from tests.support.postfix import private_postfix
from tests.support.postfix import read as read_log
from tests.support.process import free_port
from tests.support.server import in_thread
from tests.support.timing import wait_until

TEXT = b"Subject: verified\r\nMessage-ID: <v1@client.test>\r\n\r\nhello\r\n"
UNKNOWN = "550 5.1.1 <nobody@mx.test>: Recipient address rejected: no such user here"


class KeepForward(Plugin):
    """Keeps ``notes["forward"]`` of each delivery (the next hop's replies, any bounce)."""

    def register(self) -> None:
        self.forward: list[Any] = []

    def hook_queue_post(self, transaction: Any) -> None:
        self.forward.append(transaction.notes.get("forward"))


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture
def outcomes() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("event") == "plugin_outcome" and event.get("plugin") == "rcpt_verify":
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def session(address: tuple[str, int], rcpts: list[str], data: bool = True) -> list[Any]:
    """EHLO, MAIL, each RCPT, then DATA and the text if any RCPT was taken: the replies
    to the RCPTs and (if sent) to the end of DATA."""
    with Client(address, timeout=60) as client:
        assert client.cmd("EHLO client.test").code == 250
        assert client.cmd("MAIL FROM:<a@example.org>").code == 250
        replies = [client.cmd(f"RCPT TO:{rcpt}") for rcpt in rcpts]
        if data and any(reply.code == 250 for reply in replies):
            assert client.cmd("DATA").code == 354
            replies.append(client.message(TEXT))
        client.cmd("QUIT")
    return replies


# -- real next hops -------------------------------------------------------------------
POSTFIX_MASTER_CF = """\
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
"""

# mx.test is Postfix's own domain, with one local user; what it accepts goes on to the
# aiosmtpd hop (local_transport), so the test sees what Postfix delivered.
POSTFIX_MAIN_CF = """\
mydestination = mx.test
relay_domains = example.org
local_recipient_maps = texthash:{root}/etc/users
local_transport = smtp:[127.0.0.1]:{hop}
relayhost = [127.0.0.1]:{hop}
"""


@pytest_twisted.ensureDeferred
async def test_postfix_unknown_user_is_refused_at_rcpt_and_nothing_bounces(qpconn_server, outcomes):
    files = {"users": "known@mx.test x\nknown x\n"}
    with (
        aiosmtpd_next_hop() as (hop, controller),
        private_postfix(POSTFIX_MAIN_CF, POSTFIX_MASTER_CF, files, hop=controller.port) as pf,
    ):
        keep = KeepForward(Config(None), "keep")
        forward = f"queue/smtp-forward 127.0.0.1 {pf.port} timeout=20"
        server = qpconn_server(
            plugins=["relay", "rcpt_verify timeout=30", "rcpt_ok", forward, keep]
        )
        known, unknown, end = await in_thread(
            session, server.address, ["<known@mx.test>", "<nobody@mx.test>"]
        )
        assert known.code == 250, known
        # Postfix's own reply, code and words, is the client's
        assert unknown.code == 550, unknown
        assert unknown.text.startswith("5.1.1 <nobody@mx.test>: Recipient address rejected: ")
        assert "User unknown in local recipient table" in unknown.text
        assert end.code == 250 and "said: 2.0.0 Ok: queued as " in end.text, end
        assert await in_thread(wait_until, lambda: len(hop.messages) == 1, 20), read_log(pf.maillog)
    (message,) = hop.messages
    assert (message.sender, message.recipients) == ("a@example.org", ["known@mx.test"])
    (forwarded,) = keep.forward
    assert list(forwarded["rcpts"]) == ["<known@mx.test>"] and "bounce" not in forwarded
    assert [e["outcome"] for e in outcomes] == ["accepted", "refused"]


@pytest_twisted.ensureDeferred
async def test_dovecot_lmtp_unknown_user_is_refused_at_rcpt(qpconn_server, outcomes):
    with private_dovecot(["known@mx.test"]) as dovecot:
        server = qpconn_server(
            plugins=["rcpt_verify timeout=30", "rcpt_ok", f"queue/lmtp 127.0.0.1 {dovecot.port}"]
        )
        known, unknown, end = await in_thread(
            session, server.address, ["<known@mx.test>", "<nobody@mx.test>"]
        )
        assert known.code == 250, known
        assert (unknown.code, unknown.text) == (
            550,
            "5.1.1 <nobody@mx.test> User doesn't exist: nobody@mx.test",
        )
        assert end.code == 250, end
        (stored,) = dovecot.delivered("known")
    assert b"Delivered-To: known@mx.test\n" in stored and b"\nSubject: verified\n" in stored
    assert [e["outcome"] for e in outcomes] == ["accepted", "refused"]


# -- the cache, the policy, the connections (aiosmtpd as the next hop) -----------------
@pytest_twisted.ensureDeferred
async def test_verdicts_are_cached_and_only_our_domains_are_asked(qpconn_server, outcomes):
    recorder = Recorder(rcpt_replies={"nobody@mx.test": UNKNOWN})
    with aiosmtpd_next_hop(recorder) as (hop, controller):
        line = f"rcpt_verify host=127.0.0.1 port={controller.port} negative_ttl 600"
        server = qpconn_server(plugins=[line, "rcpt_ok", "queue/maildir maildir"])
        rcpts = ["<known@mx.test>", "<nobody@mx.test>", "<else@elsewhere.test>"]
        first = await in_thread(session, server.address, rcpts)
        second = await in_thread(session, server.address, rcpts)
    for known, unknown, foreign, end in (first, second):
        assert known.code == 250 and end.code == 250
        assert (unknown.code, unknown.text) == (550, UNKNOWN[4:])
        assert (foreign.code, foreign.text) == (550, "5.7.1 Relaying denied")  # rcpt_ok's
    asked = [c for c in hop.commands if c.startswith(("MAIL", "RCPT"))]
    assert asked == ["MAIL <>", "RCPT known@mx.test", "MAIL <>", "RCPT nobody@mx.test"]
    assert [e["outcome"] for e in outcomes] == [
        "accepted", "refused", "cached_accepted", "cached_refused"]  # fmt: skip
    assert len(hop.hellos) == 1  # one pooled connection served both probes


@pytest_twisted.ensureDeferred
async def test_temporary_refusal_is_passed_on_and_not_cached(qpconn_server):
    recorder = Recorder(rcpt_replies={"busy@mx.test": "450 4.2.1 Mailbox busy, come back"})
    with aiosmtpd_next_hop(recorder) as (hop, controller):
        line = f"rcpt_verify host 127.0.0.1 port {controller.port}"
        server = qpconn_server(plugins=[line, "rcpt_ok", "queue/maildir maildir"])
        for _ in range(2):
            (reply,) = await in_thread(session, server.address, ["<busy@mx.test>"])
            assert (reply.code, reply.text) == (450, "4.2.1 Mailbox busy, come back")
    assert hop.commands.count("RCPT busy@mx.test") == 2


@pytest_twisted.ensureDeferred
async def test_next_hop_down_tempfails_by_default_or_accepts(qpconn_server, outcomes, errors):
    port = free_port()  # nothing listens there
    strict = qpconn_server(
        plugins=[f"rcpt_verify host=127.0.0.1 port={port}", "rcpt_ok", "queue/maildir maildir"]
    )
    metrics = ServerMetrics(strict.factory).attach()
    try:
        (reply,) = await in_thread(session, strict.address, ["<known@mx.test>"])
    finally:
        metrics.detach()
    assert reply.code == 451, reply
    assert reply.text.startswith(f"4.4.3 Cannot verify <known@mx.test> with 127.0.0.1:{port} (")
    assert (
        metrics.registry.get_sample_value(
            "qpconn_plugin_outcomes_total", {"plugin": "rcpt_verify", "outcome": "error"}
        )
        == 1.0
    )
    lenient = qpconn_server(
        plugins=[
            f"rcpt_verify host=127.0.0.1 port={port} on_error=accept",
            "rcpt_ok",
            "queue/maildir maildir",
        ]
    )
    known, end = await in_thread(session, lenient.address, ["<known@mx.test>"])
    assert known.code == 250 and end.code == 250
    assert [(e["outcome"], e["policy"]) for e in outcomes] == [
        ("error", "tempfail"), ("error", "accept")]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_next_hop_that_never_answers_is_given_up_after_timeout(qpconn_server, outcomes):
    with ScriptedServer(lambda sock: hung.hang(sock)) as hung:
        line = f"rcpt_verify host=127.0.0.1 port={hung.port} timeout=1"
        server = qpconn_server(plugins=[line, "rcpt_ok", "queue/maildir maildir"])
        (reply,) = await in_thread(session, server.address, ["<known@mx.test>"])
    assert reply.code == 451 and "(timed out waiting for the next hop)" in reply.text, reply
    assert [e["reason"] for e in outcomes] == ["timed out waiting for the next hop"]


@pytest_twisted.ensureDeferred
async def test_a_connection_is_retired_after_a_few_refusals(qpconn_server):
    unknown = [f"nobody{n}@mx.test" for n in range(MAX_REFUSALS + 1)]
    recorder = Recorder(rcpt_replies={rcpt: UNKNOWN for rcpt in unknown})
    with aiosmtpd_next_hop(recorder) as (hop, controller):
        line = f"rcpt_verify host=127.0.0.1 port={controller.port}"
        server = qpconn_server(plugins=[line, "rcpt_ok", "queue/maildir maildir"])
        replies = await in_thread(session, server.address, [f"<{r}>" for r in unknown])
    assert [reply.code for reply in replies] == [550] * len(unknown)
    # Postfix slows down after 10 errors a session and hangs up after 20: a fresh one
    assert len(hop.hellos) == 2


@pytest_twisted.ensureDeferred
async def test_next_hop_taken_from_the_queue_plugin(qpconn_server):
    recorder = Recorder(rcpt_replies={"nobody@mx.test": UNKNOWN})
    with aiosmtpd_next_hop(recorder) as (hop, controller):
        forward = f"queue/smtp-forward 127.0.0.1 {controller.port}"
        server = qpconn_server(plugins=["rcpt_verify", "rcpt_ok", forward])
        known, unknown, end = await in_thread(
            session, server.address, ["<known@mx.test>", "<nobody@mx.test>"]
        )
        assert await in_thread(wait_until, lambda: len(hop.messages) == 1, 10)
    assert (known.code, unknown.code, end.code) == (250, 550, 250)
    assert [m.recipients for m in hop.messages] == [["known@mx.test"]]
    assert [m.sender for m in hop.messages] == ["a@example.org"]  # no bounce from <>


def test_without_a_next_hop_the_server_does_not_start(tmp_path):
    from tests.support.server import start_server

    with pytest.raises(ValueError, match="no host= given, and 0 queue/smtp-forward"):
        start_server(tmp_path, plugins=["rcpt_verify", "rcpt_ok", "queue/maildir maildir"])


@pytest.mark.parametrize(
    "args, problem",
    [
        (["port=25"], "port without host"),
        (["host=127.0.0.1", "lmtp=yes"], "lmtp needs a port"),
        (["host=127.0.0.1", "on_error=maybe"], "on_error must be one of tempfail|accept"),
        (["host=127.0.0.1", "sender=not an address"], "is not an address"),
        (["socket=/run/x", "host=127.0.0.1"], "socket excludes host and port"),
    ],
)
def test_bad_arguments_stop_the_start(args, problem):
    with pytest.raises(PluginLoadError, match=problem):
        load_plugin(Config(None), "rcpt_verify", *args)


def test_cache_expires_and_stays_bounded():
    now = [0.0]
    cache: TTLCache[str] = TTLCache(2, lambda: now[0])
    cache.put("a", "yes", 10)
    cache.put("b", "no", 1)
    assert (cache.get("a"), cache.get("b")) == ("yes", "no")
    now[0] = 1.0
    assert cache.get("b") is None and cache.get("a") == "yes"
    cache.put("c", "x", 10)
    cache.put("d", "y", 10)  # over the bound: the least recently used ("a") goes
    assert len(cache) == 2 and cache.get("a") is None and cache.get("d") == "y"
    cache.put("e", "z", 0)  # a zero lifetime keeps nothing
    assert cache.get("e") is None


@pytest_twisted.ensureDeferred
async def test_the_documented_plugins_lines_work(qpconn_server):
    lines = plugins_example("rcpt_verify")
    assert lines == ["relay", "rcpt_verify", "rcpt_ok", "queue/smtp-forward 10.0.0.25 25"]
    recorder = Recorder(rcpt_replies={"nobody@mx.test": UNKNOWN})
    with aiosmtpd_next_hop(recorder) as (hop, controller):
        # as written, with this test's next hop for the documentation's 10.0.0.25:25
        here = [line.replace("10.0.0.25 25", f"127.0.0.1 {controller.port}") for line in lines]
        server = qpconn_server(plugins=here)
        replies = await in_thread(session, server.address, ["<known@mx.test>", "<nobody@mx.test>"])
        assert await in_thread(wait_until, lambda: len(hop.messages) == 1, 10)
    assert [reply.code for reply in replies] == [250, 550, 250]
    assert [m.recipients for m in hop.messages] == [["known@mx.test"]]
