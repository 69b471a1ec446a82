"""The shipped envelope and message plugins through :mod:`qpconn.testing`, in-process.

These are the plugins' own logic tests: a scripted session per case, no sockets, every
reply and verdict at hand. The same plugins are also tested end to end against a real
server (tests/test_plugin_envelope.py, tests/test_plugin_message.py,
tests/test_plugin_hosts_allow.py): that is how users meet them.
"""

from __future__ import annotations

import email.utils

import pytest

from qpconn.testing import Harness, run_session, send_message

RCPT = {"rcpthosts": "mx.test"}
HELLO = "EHLO client.example"


def verdicts(result, plugin):
    return [v for v in result.connection_notes.get("verdicts", []) if v["plugin"] == plugin]


def message(*fields: str, body: str = "hello\n") -> bytes:
    return ("\n".join(fields) + "\n\n" + body).encode()


DATE = "Date: " + email.utils.formatdate(0)  # the fake clock starts at 0


@pytest.mark.parametrize(
    ("sender", "code", "text"),
    [
        ("spammer@example.net", 550, "Your envelope sender is in my badmailfrom list"),
        ("SPAMMER@Example.NET", 550, "Your envelope sender is in my badmailfrom list"),
        ("anyone@bad.example", 550, "We do not take mail from bad.example"),
        ("bulk-offers@ok.example", 550, "Your envelope sender is in my badmailfrom list"),
        ("friend@ok.example", 250, None),
        ("", 250, None),  # the null sender is never listed
    ],
)
def test_badmailfrom_refuses_listed_senders(sender, code, text):
    result = run_session(
        ["badmailfrom", "rcpt_ok"],
        [HELLO, f"MAIL FROM:<{sender}>"],
        config={
            "badmailfrom": [
                "spammer@example.net",
                "@bad.example We do not take mail from bad.example",
                "/^bulk-/",
            ]
        },
    )
    assert result.codes[-1] == code
    if text is not None:
        assert result.replies[-1].text == text
        assert result.replies[-1].enhanced == "5.7.1"
        assert [v["result"] for v in verdicts(result, "badmailfrom")] == ["fail"]


def test_badmailfrom_reject_temp_and_record_only():
    script = [HELLO, "MAIL FROM:<spammer@example.net>"]
    files = {"badmailfrom": "spammer@example.net"}
    temp = run_session(["badmailfrom reject_type temp"], script, config=files)
    assert temp.codes[-1] == 450
    logged = run_session(["badmailfrom reject 0"], script, config=files)
    assert logged.codes[-1] == 250
    assert [v["result"] for v in verdicts(logged, "badmailfrom")] == ["fail"]


def test_badrcptto_refuses_listed_recipients_even_for_relay_clients():
    files = {**RCPT, "badrcptto": ["trap@mx.test", "@old.mx.test"], "relayclients": "192.0.2.9"}
    script = [
        HELLO,
        "MAIL FROM:<a@example.org>",
        "RCPT TO:<trap@mx.test>",
        "RCPT TO:<x@old.mx.test>",
        "RCPT TO:<user@mx.test>",
    ]
    for ip in ("192.0.2.1", "192.0.2.9"):
        result = run_session(["relay", "badrcptto", "rcpt_ok"], script, config=files, remote_ip=ip)
        assert result.codes[-3:] == [550, 550, 250], ip
        assert result.replies[-3].text == "Mail to this recipient is not accepted here"
        assert result.connection["relay_client"] is (ip == "192.0.2.9")


def test_dont_require_anglebrackets_wraps_bare_paths():
    script = [HELLO, "MAIL FROM:a@example.org SIZE=10", "RCPT TO:user@mx.test", "MAIL FROM:"]
    without = run_session(["rcpt_ok"], script[:3], config=RCPT)
    assert without.codes[-2:] == [501, 503]
    result = run_session(["dont_require_anglebrackets", "rcpt_ok"], script[:3], config=RCPT)
    assert result.codes[-2:] == [250, 250]
    (txn,) = result.transactions
    assert txn.sender == "<a@example.org>" and txn.recipients == ["<user@mx.test>"]
    empty = run_session(["dont_require_anglebrackets"], [HELLO, "MAIL FROM:"])
    assert empty.codes[-1] == 501  # an empty path stays a syntax error


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        (["From: a@example.org", DATE, "Subject: hi"], 250),
        (["From: a@example.org", "Subject: no date"], 552),
        (["From: a@example.org", DATE, "Subject: one", "Subject: two"], 552),
        (["From: a@example.org", "Date: " + email.utils.formatdate(30 * 86400)], 552),
        (["From: a@example.org", "Date: not a date at all"], 552),
    ],
    ids=["good", "no-date", "two-subjects", "future", "garbage-date"],
)
def test_headers_judges_the_header_against_the_fake_clock(fields, code):
    result = send_message(["headers", "rcpt_ok"], "a@example.org", ["u@mx.test"],
                          message(*fields), config=RCPT)  # fmt: skip
    assert result.codes[-2] == code  # the reply to the message; QUIT's 221 follows
    if code == 552:
        assert result.replies[-2].enhanced == "5.6.0"
        assert result.messages == []
    else:
        assert len(result.messages) == 1


def test_headers_future_limit_follows_the_clock():
    """A Date 30 days ahead is refused at time 0 and fine 29 days later on the fake clock."""
    text = message("From: a@example.org", "Date: " + email.utils.formatdate(30 * 86400))
    with Harness(["headers", "rcpt_ok"], config=RCPT) as harness:
        script = [HELLO, "MAIL FROM:<a@example.org>", "RCPT TO:<u@mx.test>", "DATA",
                  text.replace(b"\n", b"\r\n") + b".\r\n"]  # fmt: skip
        assert harness.run(script).codes[-1] == 552
        harness.clock.advance(29 * 86400)
        assert harness.run(script).codes[-1] == 250


@pytest.mark.parametrize(("hops", "code"), [(2, 250), (3, 554)])
def test_loop_counts_received_and_delivered_to(hops, code):
    fields = ["Received: from a by b", "Delivered-To: u@mx.test"][: hops - 1]
    fields += ["Received: from c by d"] * (hops - 1 - len(fields))
    result = send_message(["loop 2", "rcpt_ok"], "a@example.org", ["u@mx.test"],
                          message(*fields, "From: a@example.org"), config=RCPT)  # fmt: skip
    # our own Received line is counted too: hops - 1 in the message, plus ours
    assert result.codes[-2] == code
    if code == 554:
        assert result.replies[-2].enhanced == "5.4.6"
        assert result.replies[-2].text.startswith(f"Too many hops ({hops})")


@pytest.mark.parametrize(
    ("sender", "recipients", "fields", "code"),
    [
        ("", ["u@mx.test"], ["Return-Path: <>"], 250),
        ("", ["u@mx.test", "v@mx.test"], [], 552),
        ("", ["u@mx.test"], ["Return-Path: <someone@example.org>"], 552),
        ("a@example.org", ["u@mx.test", "v@mx.test"], [], 250),
    ],
    ids=["real-bounce", "two-recipients", "return-path", "not-a-bounce"],
)
def test_bogus_bounce(sender, recipients, fields, code):
    result = send_message(["bogus_bounce", "rcpt_ok"], sender, recipients,
                          message(*fields, "From: mailer-daemon@example.org"),
                          config=RCPT)  # fmt: skip
    assert result.codes[-2] == code
    soft = send_message(["bogus_bounce denysoft", "rcpt_ok"], sender, recipients,
                        message(*fields), config=RCPT)  # fmt: skip
    assert soft.codes[-2] == (452 if code == 552 else 250)


@pytest.mark.parametrize(
    ("ip", "code", "closed"),
    [
        ("192.0.2.10", 220, False),
        ("198.51.100.7", 550, True),
        ("203.0.113.5", 450, True),
        ("2001:db8::1", 550, True),
    ],
)
def test_hosts_allow_rules_decide_by_the_client_address(ip, code, closed):
    files = {
        "hosts_allow": [
            "192.0.2.0/24 allow",
            "198.51.100.0/24 deny",
            "203.0.113.5 denysoft 4.7.1 come back later",
            "2001:db8::/32 DENY",
        ]
    }
    result = run_session(["hosts_allow"], [HELLO], config=files, remote_ip=ip)
    assert result.codes[0] == code
    assert result.closed_by_server is closed
    if ip == "203.0.113.5":
        assert result.replies[0].text == "come back later"


def test_count_unrecognized_commands_disconnects_after_n():
    script = [HELLO, "FOO", "BAR", "BAZ", "NOOP"]
    result = run_session(["count_unrecognized_commands 3"], script)
    assert result.codes == [220, 250, 500, 500, 521]
    assert result.closed_by_server
    two = run_session(["count_unrecognized_commands 3"], [HELLO, "FOO", "BAR", "NOOP"])
    assert two.codes == [220, 250, 500, 500, 250] and not two.closed_by_server


@pytest.mark.parametrize(
    ("stage", "refused_at"),
    [("mail", 2), ("rcpt", 3), ("data", 4)],
)
def test_naughty_gives_a_marked_refusal_at_its_stage(stage, refused_at):
    """badmailfrom marks (``reject naughty``); naughty refuses at the chosen stage."""
    script = [HELLO, "MAIL FROM:<spammer@example.net>", "RCPT TO:<u@mx.test>", "DATA"]
    result = run_session(
        ["badmailfrom reject naughty", f"naughty reject {stage}", "rcpt_ok"],
        script,
        config={**RCPT, "badmailfrom": "spammer@example.net"},
    )
    codes = result.codes[1:]  # after the greeting: EHLO, MAIL, RCPT, DATA
    assert codes[refused_at - 1] in (550, 554)
    assert all(code == 250 for code in codes[1 : refused_at - 1])
    assert result.replies[refused_at].enhanced == "5.7.1"
    assert "badmailfrom" in result.replies[refused_at].text
    (mark,) = [v for v in verdicts(result, "naughty")]
    assert mark["reason"] == "marked by badmailfrom at mail" and mark["stage"] == stage
