"""Time-dependent shipped plugins through :mod:`qpconn.testing`, on the fake clock.

greylisting's grey period, karma's penalty box and earlytalker's held greeting all
depend on time; here the test moves a :class:`twisted.internet.task.Clock` instead of
waiting, or rewriting the plugins' SQLite files. The plugins read time from the clock
the server gives them (``self.server.clock``: the reactor in production), and the kit
runs their SQLite work inline (``qpconn.testing.INLINE_POOLS``), so a whole session
happens in fake time. The end-to-end versions are tests/test_plugin_greylisting.py,
tests/test_plugin_karma.py and tests/test_earlytalker.py.
"""

from __future__ import annotations

import sqlite3

import pytest
from twisted.internet.task import Clock

from qpconn.testing import Harness, run_session

RCPT = {"rcpthosts": "mx.test"}
HELLO = "EHLO client.example"
ENVELOPE = [HELLO, "MAIL FROM:<a@example.org>", "RCPT TO:<u@mx.test>"]


def verdicts(result, plugin):
    return [v for v in result.connection_notes.get("verdicts", []) if v["plugin"] == plugin]


# -- greylisting ------------------------------------------------------------------------------
@pytest.fixture
def grey(tmp_path):
    line = f"greylisting db {tmp_path / 'grey.db'} black_timeout 300 grey_timeout 3600"
    with Harness([line, "rcpt_ok"], config=RCPT) as harness:
        yield harness


def test_greylisting_grey_period_passes_on_the_fake_clock(grey):
    first = grey.run(ENVELOPE, remote_ip="192.0.2.7")
    assert first.codes[-1] == 450
    assert first.replies[-1].text == "Greylisted, try again later"
    assert verdicts(first, "greylisting")[0]["reason"].startswith("new: 192.0.2.0/24")
    grey.clock.advance(299)  # still inside black_timeout: a retry this fast is refused
    assert grey.run(ENVELOPE, remote_ip="192.0.2.7").codes[-1] == 450
    grey.clock.advance(2)
    # another address of the same /24, after black_timeout: passes and is whitelisted
    passed = grey.run(ENVELOPE, remote_ip="192.0.2.200")
    assert passed.codes[-1] == 250
    assert verdicts(passed, "greylisting")[0]["reason"].startswith("passed:")
    grey.clock.advance(86400)
    white = grey.run(ENVELOPE, remote_ip="192.0.2.7")
    assert white.codes[-1] == 250
    assert verdicts(white, "greylisting")[0]["reason"].startswith("white:")
    # another network, or another sender, is a new triplet
    assert grey.run(ENVELOPE, remote_ip="198.51.100.7").codes[-1] == 450


def test_greylisting_triplet_expires_after_grey_timeout(grey):
    assert grey.run(ENVELOPE).codes[-1] == 450
    grey.clock.advance(3601)  # the client came back too late: starts over
    late = grey.run(ENVELOPE)
    assert late.codes[-1] == 450
    assert verdicts(late, "greylisting")[0]["reason"].startswith("expired:")
    grey.clock.advance(301)
    assert grey.run(ENVELOPE).codes[-1] == 250


def test_greylisting_records_fake_times_and_spares_relay_clients(tmp_path):
    db = tmp_path / "grey.db"
    files = {**RCPT, "relayclients": "192.0.2.9"}
    with Harness(["relay", f"greylisting db {db}", "rcpt_ok"], config=files) as harness:
        harness.clock.advance(1000)
        assert harness.run(ENVELOPE).codes[-1] == 450
        relay = harness.run(ENVELOPE, remote_ip="192.0.2.9")
        assert relay.codes[-1] == 250
        assert verdicts(relay, "greylisting")[0]["result"] == "skip"
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT network, first_seen FROM greylist").fetchall()
    assert rows == [("192.0.2.0/24", 1000.0)]  # the fake clock's time, not the wall's


def test_greylisting_testonly_records_but_lets_through(tmp_path):
    result = run_session([f"greylisting db {tmp_path / 'g.db'} mode testonly", "rcpt_ok"],
                         ENVELOPE, config=RCPT)  # fmt: skip
    assert result.codes[-1] == 250
    (verdict,) = verdicts(result, "greylisting")
    assert (verdict["result"], verdict["action"]) == ("fail", "log")


# -- karma ---------------------------------------------------------------------------------
def test_karma_penalty_box_expires_on_the_fake_clock(tmp_path):
    files = {**RCPT, "badrcptto": "trap@mx.test"}
    plugins = [f"karma db {tmp_path / 'karma.db'}", "badrcptto", "rcpt_ok"]
    bad = [HELLO, "MAIL FROM:<a@example.org>", *["RCPT TO:<trap@mx.test>"] * 3, "QUIT"]
    with Harness(plugins, config=files) as harness:
        scored = harness.run(bad, remote_ip="192.0.2.66")
        assert scored.codes[3:6] == [550, 550, 550]
        assert scored.connection_notes["karma"] == {"history": 0, "good": 0, "bad": 3}
        harness.clock.advance(3600)
        boxed = harness.run([HELLO], remote_ip="192.0.2.66")
        assert boxed.codes[0] == 450 and boxed.closed_by_server
        assert "poor reputation here (karma -3)" in boxed.replies[0].text
        # another client is not affected
        assert harness.run([HELLO], remote_ip="192.0.2.67").codes == [220, 250]
        harness.clock.advance(86400 - 3600 + 1)  # penalty_days 1 after the last bad point
        free = harness.run([*ENVELOPE, "QUIT"], remote_ip="192.0.2.66")
        assert free.codes == [220, 250, 250, 250, 221]
        assert verdicts(free, "karma")[0]["reason"] == "karma -3"


def test_karma_good_mail_earns_points_and_penalty_days_0_forgives(tmp_path):
    db = tmp_path / "karma.db"
    files = {**RCPT, "badrcptto": "trap@mx.test"}
    good = [*ENVELOPE, "DATA", b"Subject: x\r\n\r\nhi\r\n.\r\n", "QUIT"]
    bad = [HELLO, "MAIL FROM:<a@example.org>", *["RCPT TO:<trap@mx.test>"] * 4]
    with Harness([f"karma db {db}", "badrcptto", "rcpt_ok"], config=files) as harness:
        assert harness.run(good).codes[-2:] == [250, 221]
        harness.run(bad)
        assert harness.run([HELLO]).codes[0] == 450  # 1 good - 4 bad = -3
    with Harness([f"karma db {db} penalty_days 0", "rcpt_ok"], config=files) as harness:
        assert harness.run([HELLO]).codes == [220, 250]
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT good, bad, connections FROM karma").fetchone()
    assert row == (1, 4, 2)


def test_karma_reject_naughty_refuses_at_rcpt_and_does_not_count_its_own_refusal(tmp_path):
    db = tmp_path / "karma.db"
    files = {**RCPT, "badrcptto": "trap@mx.test"}
    plugins = [f"karma db {db} reject naughty", "badrcptto", "naughty", "rcpt_ok"]
    with Harness(plugins, config=files) as harness:
        harness.run([HELLO, "MAIL FROM:<a@example.org>", *["RCPT TO:<trap@mx.test>"] * 3])
        harness.clock.advance(60)
        marked = harness.run(ENVELOPE)
        assert marked.codes == [220, 250, 250, 450]  # greeted, refused at RCPT by naughty
        assert marked.replies[-1].enhanced == "4.7.1"
        assert "poor reputation" in marked.replies[-1].text
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT good, bad, connections FROM karma").fetchone()
    assert row == (0, 3, 1)  # the second session scored nothing: its refusal was karma's


# -- earlytalker ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "early", "codes"),
    [
        ("earlytalker wait 5", b"", [220, 250]),
        ("earlytalker wait 5", b"EHLO bot.example\r\n", [450]),
        ("earlytalker wait 5 action deny", b"EHLO bot.example\r\n", [550]),
        ("earlytalker wait 5 action log", b"EHLO bot.example\r\n", [220, 250, 250]),
        ("earlytalker wait 5 defer-reject 1", b"EHLO bot.example\r\n", [220, 250, 450]),
    ],
    ids=["patient", "denysoft", "deny", "log", "defer-reject"],
)
def test_earlytalker_holds_the_greeting_on_the_fake_clock(line, early, codes):
    script = [] if early else [HELLO]
    if "log" in line or "defer" in line:
        script = ["MAIL FROM:<a@example.org>"]  # the EHLO was sent early
    clock = Clock()
    result = run_session([line], script, early=early, clock=clock)
    # five fake seconds, not real ones: a wait on the real reactor would have left the fake
    # clock alone (and the helper refuses to wait on what it cannot advance)
    assert clock.seconds() == 5
    assert result.codes == codes
    assert result.connection_notes.get("early_talker", False) is bool(early)
    if codes[0] in (450, 550):
        reply = result.replies[0]
        assert reply.text == "Connecting host started transmitting before SMTP greeting"
        assert reply.enhanced == ("4.7.1" if codes[0] == 450 else "5.7.1")
        assert result.closed_by_server
    if "defer-reject" in line:  # greeted, then refused at MAIL with the same reply
        assert result.replies[-1].enhanced == "4.7.1"
        assert result.replies[-1].text.startswith("Connecting host started transmitting")


def test_earlytalker_waits_exactly_its_time_and_spares_relay_clients():
    with Harness(["relay", "earlytalker wait 7.5"], config={"relayclients": "192.0.2.9"}) as kit:
        kit.run([HELLO])
        assert kit.clock.seconds() == 7.5
        kit.run([HELLO], remote_ip="192.0.2.9", early=b"EHLO x\r\n")
        assert kit.clock.seconds() == 7.5  # a relay client is neither delayed nor judged
