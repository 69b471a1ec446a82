"""The shipped DNS-driven plugins through :mod:`qpconn.testing`: answers from a table.

Each case states the DNS world in a :class:`~qpconn.testing.DNSTable` (NXDOMAIN unless
listed; ``"timeout"`` and ``"servfail"`` for failures) and checks both the reply and
what the plugin asked. The end-to-end versions with a loopback DNS server are in
tests/test_plugin_helo.py, tests/test_plugin_dnsbl.py and tests/test_e2e_lookups.py.
"""

from __future__ import annotations

import pytest

from qpconn.testing import run_session

RCPT = {"rcpthosts": "mx.test"}
ENVELOPE = ["MAIL FROM:<a@example.org>", "RCPT TO:<u@mx.test>"]


def verdicts(result, plugin):
    return [v for v in result.connection_notes.get("verdicts", []) if v["plugin"] == plugin]


# -- helo ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("policy", "name", "answers", "code"),
    [
        ("lenient", "client.example", {}, 250),
        ("lenient", "mx.test", {}, 550),  # claims to be us
        ("lenient", "192.0.2.1", {}, 550),  # an IP without brackets
        ("lenient", "[192.0.2.99]", {}, 550),  # a literal that is not the client
        ("lenient", "[192.0.2.1]", {}, 250),
        ("lenient", "spammer.example", {}, 550),  # in badhelo
        ("rfc", "client.example", {}, 550),  # does not resolve
        ("rfc", "client.example", {("client.example", "MX"): "10 mx.client.example"}, 250),
        ("rfc", "client.example", {("client.example", "A"): "servfail"}, 450),
        ("strict", "client", {("client", "A"): "192.0.2.1"}, 550),  # no dot
        ("strict", "client.example", {("client.example", "A"): "192.0.2.50"}, 550),
        ("strict", "client.example", {("client.example", "A"): ["198.51.100.1", "192.0.2.1"]},
         250),
    ],
)  # fmt: skip
def test_helo_policies(policy, name, answers, code):
    result = run_session(
        [f"helo policy {policy}"],
        [f"EHLO {name}"],
        config={"badhelo": "spammer.example"},
        dns_answers=answers,
        rdns=False,
    )
    assert result.codes == [220, code]
    if code == 550:
        assert result.replies[-1].enhanced == "5.7.1"
        assert verdicts(result, "helo")[-1]["result"] == "fail"
    if policy == "rfc":
        assert ("client.example", "A") in result.dns.questions


def test_helo_refusal_lets_the_client_try_again_and_spares_relay_clients():
    result = run_session(["helo"], ["EHLO mx.test", "EHLO client.example"], rdns=False)
    assert result.codes == [220, 550, 250]
    relay = run_session(["relay", "helo"], ["EHLO mx.test"], config={"relayclients": "192.0.2.1"})
    assert relay.codes == [220, 250]


# -- dnsbl ----------------------------------------------------------------------------------
LISTED = {("1.2.0.192.bl.example", "A"): "127.0.0.2", ("1.2.0.192.bl.example", "TXT"): "see x"}


def test_dnsbl_refuses_at_rcpt_but_lets_postmaster_through():
    result = run_session(
        ["dnsbl", "rcpt_ok"],
        ["EHLO c.example", *ENVELOPE, "RCPT TO:<postmaster@mx.test>"],
        config={**RCPT, "dnsbl_zones": "bl.example"},
        dns_answers=LISTED,
    )
    assert result.codes == [220, 250, 250, 550, 250]
    assert ("1.2.0.192.bl.example", "A") in result.dns.questions
    assert result.transactions[0].recipients == ["<postmaster@mx.test>"]


def test_dnsbl_stage_connect_refuses_before_the_greeting():
    files = {**RCPT, "dnsbl_zones": "bl.example"}
    result = run_session(
        ["dnsbl stage connect", "rcpt_ok"], ["EHLO c.example"], config=files, dns_answers=LISTED
    )
    assert result.codes[0] == 550


@pytest.mark.parametrize("who", ["dnsbl_allow", "relay_client"])
def test_dnsbl_never_asks_about_allowed_clients(who):
    files = {**RCPT, "dnsbl_zones": "bl.example", "dnsbl_allow": "192.0.2.0/24"}
    plugins = ["dnsbl", "rcpt_ok"]
    if who == "relay_client":
        files = {**RCPT, "dnsbl_zones": "bl.example", "relayclients": "192.0.2.1"}
        plugins = ["relay", *plugins]
    result = run_session(plugins, ["EHLO c.example", *ENVELOPE], config=files, dns_answers=LISTED)
    assert result.codes[-1] == 250
    assert not [q for q in result.dns.questions if q[0].endswith("bl.example")]


def test_dnsbl_errors_are_temporary_unless_ignored():
    answers = {("1.2.0.192.bl.example", "A"): "servfail"}
    files = {**RCPT, "dnsbl_zones": "bl.example"}
    script = ["EHLO c.example", *ENVELOPE]
    assert run_session(["dnsbl", "rcpt_ok"], script, config=files,
                       dns_answers=answers).codes[-1] == 450  # fmt: skip
    assert run_session(["dnsbl dns_error ignore", "rcpt_ok"], script, config=files,
                       dns_answers=answers).codes[-1] == 250  # fmt: skip


# -- rhsbl ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sender", "answer", "code"),
    [
        ("a@spam.example", "127.0.0.2", 550),
        ("a@fine.example", None, 250),
        ("a@spam.example", "timeout", 450),
        ("", "127.0.0.2", 250),  # the null sender is not checked
    ],
)
def test_rhsbl_looks_up_the_sender_domain(sender, answer, code):
    answers = {} if answer is None else {("spam.example.dbl.example", "A"): answer}
    result = run_session(["rhsbl", "rcpt_ok"], ["EHLO c.example", f"MAIL FROM:<{sender}>"],
                         config={"rhsbl_zones": "dbl.example"}, dns_answers=answers)  # fmt: skip
    assert result.codes[-1] == code
    domain = sender.partition("@")[2]
    asked = [q for q in result.dns.questions if q[0].endswith("dbl.example")]
    assert asked[:1] == ([(f"{domain}.dbl.example", "A")] if sender else [])
    if code == 550:  # listed: the zone's TXT record is asked for the reason
        assert asked[1:] == [(f"{domain}.dbl.example", "TXT")]


# -- resolvable_fromhost -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("answers", "code", "enhanced"),
    [
        ({("example.org", "MX"): "10 mx.example.org"}, 250, None),
        ({("example.org", "MX"): "0 ."}, 550, "5.7.27"),  # null MX (RFC 7505)
        ({("example.org", "A"): "192.0.2.80"}, 250, None),  # no MX: the A record will do
        ({("example.org", "AAAA"): "2001:db8::80"}, 250, None),
        ({}, 550, "5.1.8"),  # nothing at all
        ({("example.org", "MX"): "servfail"}, 450, "4.4.3"),
        ({("example.org", "MX"): "timeout"}, 450, "4.4.3"),
    ],
    ids=["mx", "null-mx", "a", "aaaa", "nxdomain", "servfail", "timeout"],
)
def test_resolvable_fromhost(answers, code, enhanced):
    result = run_session(["resolvable_fromhost"], ["EHLO c.example", "MAIL FROM:<a@example.org>"],
                         dns_answers=answers, rdns=False)  # fmt: skip
    assert result.codes[-1] == code
    assert result.replies[-1].enhanced == enhanced if enhanced else True
    assert ("example.org", "MX") in result.dns.questions


def test_resolvable_fromhost_skips_null_sender_and_literals():
    result = run_session(["resolvable_fromhost"],
                         ["EHLO c.example", "MAIL FROM:<>", "RSET", "MAIL FROM:<a@[192.0.2.5]>"],
                         rdns=False)  # fmt: skip
    assert result.codes == [220, 250, 250, 250, 250]
    assert result.dns.questions == []
