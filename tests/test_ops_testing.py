"""qpconn.testing (scripted in-process sessions) and its pytest_plugin (a real server)."""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet import defer, task

from qpconn import DENY, OK
from qpconn.plugins import Plugin
from qpconn.testing import DNSTable, run_session, send_message
from qpconn.testing.pytest_plugin import (  # noqa: F401 - fixtures
    qpconn_address,
    qpconn_config_dir,
    qpconn_start,
)

SESSION = ["EHLO client.example", "MAIL FROM:<a@example.org>", "RCPT TO:<u@mx.test>"]


class Tarpit(Plugin):
    """Waits two minutes on the server's clock before answering MAIL."""

    timeout = 300.0  # longer than the wait: plugin_timeout (30 s) would cut it off

    async def hook_mail(self, transaction, sender, params):
        await task.deferLater(self.server.clock, 120, lambda: None)
        transaction.notes["waited_until"] = self.server.clock.seconds()
        transaction.connection.notes["tarpitted"] = True
        return OK


class Forever(Plugin):
    """Never answers; its own timeout (or none) decides what happens."""

    def hook_rcpt(self, transaction, recipient, params):
        return defer.Deferred()


class Names(Plugin):
    """Refuses clients whose reverse DNS name is not forward-confirmed."""

    def hook_connect(self, transaction):
        conn = transaction.connection
        if not conn.remote_host_verified:
            return DENY, f"5.7.1 {conn.remote_host or 'no name'} does not confirm"
        return None


def test_fake_clock_lets_a_slow_hook_finish_at_once_with_its_notes():
    clock = task.Clock()
    started = time.monotonic()
    result = run_session(
        [Tarpit, "rcpt_ok"], [*SESSION, "QUIT"], clock=clock, config={"rcpthosts": "mx.test"}
    )
    assert time.monotonic() - started < 60  # two fake minutes, not two real ones
    assert result.codes == [220, 250, 250, 250, 221]
    assert result.closed_by_server
    (txn,) = result.transactions
    assert txn.notes["waited_until"] >= 120 and clock.seconds() >= 120
    assert txn.sender == "<a@example.org>" and txn.recipients == ["<u@mx.test>"]
    assert result.connection_notes["tarpitted"] is True


def test_a_hook_past_its_timeout_gets_451_in_fake_time():
    result = run_session([Forever], SESSION, config={"plugin_timeout": "30"})
    assert result.codes == [220, 250, 250, 451]


def test_a_hook_waiting_on_nothing_the_clock_drives_is_reported():
    class NoTimeout(Forever):
        timeout = 0

    with pytest.raises(RuntimeError, match="fake clock cannot advance"):
        run_session([NoTimeout], SESSION)


@pytest.mark.parametrize(
    ("answers", "codes", "host"),
    [
        pytest.param(
            {("192.0.2.7", "PTR"): "mail.example", ("mail.example", "A"): "192.0.2.7"},
            [220],
            "mail.example",
            id="confirmed",
        ),
        pytest.param(
            {("192.0.2.7", "PTR"): "liar.example", ("liar.example", "A"): "192.0.2.99"},
            [550],
            "liar.example",
            id="mismatch",
        ),
        pytest.param({("192.0.2.7", "PTR"): "servfail"}, [550], None, id="servfail"),
        pytest.param({("192.0.2.7", "PTR"): "timeout"}, [550], None, id="timeout"),
    ],
)
def test_reverse_dns_of_the_client_comes_from_the_answer_table(answers, codes, host):
    result = run_session([Names], [], dns_answers=answers, remote_ip="192.0.2.7")
    assert result.codes == codes
    assert result.connection["remote_host"] == host
    assert result.dns.questions[0] == ("7.2.0.192.in-addr.arpa", "PTR")


@pytest.mark.parametrize(
    ("answers", "rcpt_code", "verdict"),
    [
        ({("7.2.0.192.bl.example", "A"): "127.0.0.2"}, 550, "fail"),
        ({("7.2.0.192.bl.example", "A"): "timeout"}, 450, "temperror"),
        ({}, 250, "pass"),
    ],
)
def test_shipped_dnsbl_plugin_through_a_scripted_session(answers, rcpt_code, verdict):
    result = run_session(
        ["dnsbl", "rcpt_ok"],
        SESSION,
        config={"dnsbl_zones": "bl.example", "rcpthosts": "mx.test"},
        dns_answers=answers,
        remote_ip="192.0.2.7",
        rdns=False,
    )
    assert result.codes == [220, 250, 250, rcpt_code]
    (decision,) = result.connection_notes["verdicts"]
    assert decision["plugin"] == "dnsbl" and decision["result"] == verdict
    assert ("7.2.0.192.bl.example", "A") in result.dns.questions


def test_send_message_records_the_queued_text_with_dots_restored():
    result = send_message(
        ["rcpt_ok"],
        "a@example.org",
        ["u@mx.test", "v@elsewhere.example"],
        b"Subject: dots\n\n.leading dot\nend\n",
        config={"rcpthosts": "mx.test"},
    )
    assert result.codes == [220, 250, 250, 250, 550, 354, 250, 221]
    (message,) = result.messages
    assert message.startswith(b"Received: from client.example ")
    assert message.endswith(b"Subject: dots\r\n\r\n.leading dot\r\nend\r\n")
    assert result.transactions[0].recipients == ["<u@mx.test>"]


def test_dns_table_answers_records_and_errors():
    from twisted.names import dns, error

    table = DNSTable(
        {
            ("example.org", "MX"): ["10 mx1.example.org", "20 mx2.example.org"],
            ("example.org", "TXT"): "v=spf1 -all",
            ("gone.example", "A"): "nxdomain",
        }
    )
    answers, _, _ = table.lookupMailExchange("example.org").result
    assert sorted((a.payload.preference, str(a.payload.name)) for a in answers) == [
        (10, "mx1.example.org"),
        (20, "mx2.example.org"),
    ]
    (txt,), _, _ = table.lookupText("Example.ORG.").result
    assert txt.payload.data == [b"v=spf1 -all"] and txt.type == dns.TXT
    failure = table.lookupAddress("gone.example")
    failure.addErrback(lambda f: f.trap(error.DNSNameError) and "nxdomain")
    assert failure.result == "nxdomain"
    missing = table.lookupAddress("unknown.example")
    missing.addErrback(lambda f: f.trap(error.DNSNameError) and "nxdomain")
    assert missing.result == "nxdomain"
    assert table.questions[-1] == ("unknown.example", "A")


# -- the pytest fixtures: a real server in its own process ---------------------------------
@pytest.fixture
def qpconn_config_dir(tmp_path):  # noqa: F811 - overrides the plugin's default
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "me").write_text("mx.fixture.test\n")
    (directory / "rcpthosts").write_text("fixture.test\n")
    (directory / "plugins").write_text("rcpt_ok\nqueue/maildir ./fixture-mail\n")
    return directory


def test_qpconn_address_is_a_real_server_with_the_given_config(qpconn_address, tmp_path):  # noqa: F811
    host, port = qpconn_address
    assert host == "127.0.0.1"
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        _, banner = smtp.ehlo("client.test")
        assert banner.startswith(b"mx.fixture.test ")
        assert smtp.sendmail("a@example.org", ["u@fixture.test"], b"Subject: f\r\n\r\nx\r\n") == {}
    assert len(list((tmp_path / "fixture-mail" / "new").iterdir())) == 1


def test_qpconn_start_runs_several_servers_with_options(qpconn_start, tmp_path):  # noqa: F811
    first = qpconn_start(None, "--hostname", "one.test")
    second = qpconn_start(None, "--hostname", "two.test")
    assert first.address != second.address
    for server, name in ((first, b"one.test"), (second, b"two.test")):
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            assert smtp.ehlo("c")[1].startswith(name)
    assert first.stop() == 0 or first.process.returncode is not None
    assert "qpconn" in second.log()


# -- docs/testing.md, as written ----------------------------------------------------------
DOC = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC, flags=re.S)


def test_doc_examples_of_scripted_sessions_pass():
    namespace: dict[str, object] = {}  # the page's blocks read as one module
    for block in python_blocks()[:2]:
        exec(compile(block, "docs/testing.md", "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        test()  # type: ignore[operator]


def test_multiline_replies_keep_their_lines_without_repeated_codes():
    result = run_session([], ["HELP"])
    help_reply = result.replies[-1]
    assert help_reply.code == 214 and help_reply.enhanced == "2.0.0"
    assert help_reply.lines[1].startswith("Commands:")


def test_doc_fixture_example_runs_under_pytest(tmp_path):
    conftest, example = python_blocks()[2:4]
    project = tmp_path / "project"
    (project / "mycompany").mkdir(parents=True)
    (project / "mycompany" / "__init__.py").write_text("")
    (project / "mycompany" / "nobounces.py").write_text(python_blocks()[0].split("\n\ndef ")[0])
    (project / "conftest.py").write_text(conftest)
    (project / "test_example.py").write_text(example)
    env = {**os.environ, "PYTHONPATH": str(project)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
