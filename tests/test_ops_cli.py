"""``python -m qpconn init | plugins | help | test``, run as an administrator runs them.

Every command runs as a subprocess of the interpreter under test. ``init`` must write a
directory the server serves from and ``check`` passes without a warning; ``plugins`` and
``help`` read the plugins' docstrings, which docs/plugins.md's table must match; ``test``
plays one session through the configured plugins and delivers nothing unless asked.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qpconn.app.catalogue import markdown_table, shipped
from qpconn.app.check import build
from tests.support.process import free_port, running, twistd_command

DOCS = Path(__file__).resolve().parent.parent / "docs"


def qpconn(*args: str, cwd: Path, env: dict[str, str] | None = None, stdin: bytes = b""):
    return subprocess.run(
        [sys.executable, "-m", "qpconn", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_command_and_an_unknown_one_is_refused(tmp_path):
    done = qpconn("--help", cwd=tmp_path)
    assert done.returncode == 0
    for command in ("init", "check", "plugins", "help", "test"):
        assert f"\n  {command} " in done.stdout
    wrong = qpconn("serve", cwd=tmp_path)
    assert wrong.returncode == 2 and "unknown command 'serve'" in wrong.stderr


# -- init ---------------------------------------------------------------------------------
@pytest.fixture
def initialised(tmp_path) -> Path:
    done = qpconn("init", "conf", "--hostname", "mx.init.test", "--maildir", "mail", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path / "conf"


def test_init_writes_a_commented_directory_check_passes_without_warnings(initialised, tmp_path):
    names = sorted(os.listdir(initialised))
    assert {"plugins", "me", "rcpthosts", "databytes", "timeout", "max_rcpt"} <= set(names)
    for name in names:
        assert (initialised / name).read_text().startswith("# "), name  # says what it is
    assert f"queue/maildir {tmp_path / 'mail'}\n" in (initialised / "plugins").read_text()
    checked = qpconn("check", "--config", str(initialised), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr == ""  # no warning at all
    assert checked.stdout.endswith("OK\n") and "me: mx.init.test" in checked.stdout


def test_init_makes_the_server_the_built_in_defaults_make(initialised):
    made, default = build(str(initialised)).probe, build(None).probe
    for attribute in ("timeout", "databytes", "size_threshold"):
        assert getattr(made, attribute) == getattr(default, attribute), attribute
    assert made.runner.timeout == default.runner.timeout
    assert made.session_limits == default.session_limits
    lines = [p.strip() for p in (initialised / "plugins").read_text().splitlines()]
    plugins = [line.split()[0] for line in lines if line and not line.startswith("#")]
    assert plugins == ["relay", "count_unrecognized_commands", "rcpt_ok", "queue/maildir"]


def test_init_refuses_a_directory_that_has_its_files(initialised, tmp_path):
    before = (initialised / "me").read_text()
    again = qpconn("init", "conf", cwd=tmp_path)
    assert again.returncode == 1 and "already has plugins, me" in again.stderr
    assert (initialised / "me").read_text() == before


def test_twistd_serves_from_an_initialised_directory(initialised, tmp_path):
    port = free_port()
    command = twistd_command(
        "qpconn", "--config", str(initialised), "--listen", f"tcp:{port}:interface=127.0.0.1"
    )
    with running(command, port, str(tmp_path)), smtplib.SMTP("127.0.0.1", port) as smtp:
        assert smtp.ehlo("client.test")[1].startswith(b"mx.init.test")
        smtp.sendmail("a@example.org", ["user@mx.init.test"], b"Subject: init\r\n\r\nhi\r\n")
    (name,) = os.listdir(tmp_path / "mail" / "new")
    assert (tmp_path / "mail" / "new" / name).read_bytes().endswith(b"Subject: init\n\nhi\n")


# -- plugins, help ------------------------------------------------------------------------
def test_plugins_lists_every_shipped_plugin_with_its_purpose_and_hooks(tmp_path):
    done = qpconn("plugins", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        "  queue/maildir\n      store mail in a Maildir, durably, before the 250.\n" in done.stdout
    )
    assert "      hooks: connect, disconnect, deny, ok\n" in done.stdout  # karma
    for entry in shipped():
        assert f"\n  {entry.name}\n" in done.stdout
        assert entry.summary and entry.summary.endswith("."), entry.name  # a whole sentence
        assert entry.hooks, entry.name


def test_plugins_lists_installed_entry_points_and_help_reads_their_docstring(tmp_path):
    # An installed distribution as importlib.metadata finds one: a .dist-info on the path.
    site = tmp_path / "site"
    info = site / "qpconn_hello-1.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qpconn-hello\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text("[qpconn.plugins]\nhello = qpconn_hello:Hello\n")
    (site / "qpconn_hello.py").write_text(
        textwrap.dedent(
            '''
            """A package of plugins."""
            from qpconn.plugins import Plugin

            class Hello(Plugin):
                """hello: say hello at HELO, and nothing else.

                Longer text an operator reads with python -m qpconn help hello.
                """

                def hook_helo(self, transaction, host):
                    return None
            '''
        )
    )
    env = {"PYTHONPATH": str(site)}
    listed = qpconn("plugins", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "  hello (entry point of qpconn-hello 1.2)\n      say hello at HELO" in listed.stdout
    assert "      hooks: helo\n" in listed.stdout.split("installed plugins")[1]
    helped = qpconn("help", "hello", cwd=tmp_path, env=env)
    assert helped.returncode == 0, helped.stderr
    assert "Longer text an operator reads" in helped.stdout and "hooks: helo" in helped.stdout


def test_help_prints_the_plugin_docstring_and_refuses_an_unknown_name(tmp_path):
    import qpconn.plugins.queue.maildir as module

    done = qpconn("help", "queue/maildir", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert textwrap.dedent(module.__doc__ or "").strip() in done.stdout
    assert done.stdout.rstrip().endswith("hooks: queue")
    forward = qpconn("help", "queue/smtp-forward", cwd=tmp_path)  # the qpsmtpd spelling
    assert forward.returncode == 0 and "hand each message to the next MTA" in forward.stdout
    unknown = qpconn("help", "no_such_plugin", cwd=tmp_path)
    assert unknown.returncode == 1 and "no such plugin" in unknown.stderr


def test_docs_table_of_shipped_plugins_is_the_docstrings(tmp_path):
    text = (DOCS / "plugins.md").read_text(encoding="utf-8")
    start = text.index("<!-- shipped-plugins")
    table = text[text.index("\n", start) + 1 : text.index("<!-- /shipped-plugins -->")]
    assert table == markdown_table(shipped()), (
        "docs/plugins.md's table differs from the docstrings: paste the output of "
        "python -m qpconn plugins --markdown between its markers"
    )
    assert qpconn("plugins", "--markdown", cwd=tmp_path).stdout == table


# -- test ---------------------------------------------------------------------------------
def test_test_prints_each_verdict_and_the_final_reply_and_stores_nothing(initialised, tmp_path):
    done = qpconn(
        "test", "--config", str(initialised), "--ip", "192.0.2.9", "--helo", "mail.example",
        "--from", "a@example.org", "--to", "user@mx.init.test", "--to", "x@elsewhere.example",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "queue hook of queue/maildir held back (--queue delivers)\n" in out
    assert "   hook connect: relay DECLINED\n" in out
    assert "C: RCPT TO:<user@mx.init.test>\n   hook rcpt: rcpt_ok OK\nS: 250 2.1.5" in out
    assert "   hook rcpt: rcpt_ok DENY 5.7.1 Relaying denied\n   log: " in out
    assert " rcpt rejected by rcpt_ok: 550 Relaying denied\nS: 550 5.7.1 Relaying denied" in out
    assert " accepted from=<a@example.org> to=<user@mx.init.test> size=" in out  # the log line
    assert "S: 220 mx.init.test ESMTP" in out
    assert "\nfinal reply: 250 2.0.0 test run: would be queued as " in out
    assert out.endswith("\naccepted\n")
    assert not (tmp_path / "mail" / "new").exists() or not os.listdir(tmp_path / "mail" / "new")


def test_test_with_a_refusing_plugin_a_file_and_dns_answers(initialised, tmp_path):
    plugins = initialised / "plugins"
    plugins.write_text("dnsbl\n" + plugins.read_text())  # before rcpt_ok, which decides
    (initialised / "dnsbl_zones").write_text("bl.test\n")
    (tmp_path / "message.eml").write_bytes(b"Subject: from a file\n\n.dot line\n")
    base = ["test", "--config", str(initialised), "--to", "user@mx.init.test"]
    listed = qpconn(
        *base, "--ip", "192.0.2.7", "--dns", "7.2.0.192.bl.test", "A", "127.0.0.2",
        "message.eml", cwd=tmp_path,
    )  # fmt: skip
    assert listed.returncode == 1, listed.stdout + listed.stderr
    assert "hook rcpt: dnsbl DENY" in listed.stdout
    assert "\nnot accepted\n" in listed.stdout
    clean = qpconn(*base, "--ip", "192.0.2.8", "-", cwd=tmp_path, stdin=b"Subject: s\r\n\r\nb\r\n")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "C: (message, 20 bytes)" in clean.stdout  # 17 of text, the end marker


def test_test_with_queue_delivers_through_the_configured_plugin(initialised, tmp_path):
    done = qpconn(
        "test", "--config", str(initialised), "--to", "user@mx.init.test", "--queue", cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "held back" not in done.stdout
    assert "hook queue: queue/maildir OK 2.0.0 Queued as " in done.stdout
    assert len(os.listdir(tmp_path / "mail" / "new")) == 1


def test_test_refuses_what_check_refuses(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "timeout").write_text("-1\n")
    done = qpconn("test", "--config", str(tmp_path / "bad"), cwd=tmp_path)
    assert done.returncode == 1 and "error: timeout: '-1' is negative" in done.stderr


def test_test_stops_where_a_client_would_after_a_refused_mail(initialised, tmp_path):
    (initialised / "badmailfrom").write_text("spam@example.org\n")
    plugins = initialised / "plugins"
    plugins.write_text("badmailfrom\n" + plugins.read_text())
    done = qpconn("test", "--config", str(initialised), "--from", "spam@example.org", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "   hook mail: badmailfrom DENY" in done.stdout
    assert "C: RCPT" not in done.stdout and "C: DATA" not in done.stdout
    assert "\nfinal reply: 550 5.7.1 " in done.stdout and done.stdout.endswith("not accepted\n")
