"""One validator for every setting (qpconn.settings): check, start-up and reload agree.

Issue 15 item 4 and issue 19 item 1: ``timeout -5`` passed ``check`` and start-up, then
every session logged an AssertionError; ``loglevel 6`` passed ``check`` and a reload and
stopped the next restart. Here each bad value is refused by all three paths with the
file, the line and the value; each value at the edge of its range passes all three and
serves a real session; and the warnings (unread files, a plugin's file without the
plugin, no queue plugin) are given without failing anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from qpconn.app.check import CheckError, build
from qpconn.config import Config
from qpconn.plugins.auth.flat_file import hash_password
from qpconn.settings import SETTINGS, validate
from qpconn.testing.pytest_plugin import qpconn_start  # noqa: F401 - the fixture
from tests.e2e_client import Client
from tests.support.process import twistd_command
from tests.support.server import in_thread, write_config
from tests.test_docs_reference import settings_read_by_code, settings_table, ticked


def config_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    base = {"me": "mx.test\n", "plugins": "rcpt_ok\nqueue/maildir ./store\n"}
    directory = tmp_path / "settings"
    write_config(str(directory), {**base, **files})
    return directory


def check(tmp_path: Path, directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qpconn", "check", "--config", str(directory), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


# -- errors -------------------------------------------------------------------------------
BAD = [
    ("timeout", "-5", "is negative"),
    ("timeout", "0", "must be more than 0"),
    ("timeout", "nan", "is not a finite number"),
    ("timeout", "86401", "is more than 86400 (a day)"),
    ("loglevel", "6", "is not one of debug, info, warn, warning, error, critical"),
    ("plugin_timeout", "-1", "is negative"),
    ("shutdown_timeout", "-0.5", "is negative"),
    ("dns_timeout", "0", "must be more than 0"),
    ("proxy_timeout", "inf", "is not a finite number"),
    ("data_timeout", "-1", "is negative"),
    ("command_deadline", "-1", "is negative"),
    ("data_rate_grace", "soon", "is not a number"),
    ("min_data_rate", "0.5", "is not a whole number"),
    ("max_session_time", "86401", "is more than 86400 (a day)"),
    ("databytes", "-1", "is negative"),
    ("databytes", "10MB", "is not a whole number"),
    ("max_connections_per_ip", "-1", "is negative"),
    ("max_connection_rate", "1.5", "is not a whole number"),
    ("connection_rate_window", "0", "must be more than 0"),
    ("connection_limit_exceptions", "127.0.0", "is not an address, network or prefix"),
    ("relayclients", "10.0.0.0/33", "is not an address, network or prefix"),
    ("me", "mx example.com", "is not a domain name such as mx.example.com"),
    ("me", "mx..test", "is not a domain name such as mx.example.com"),
    ("me", "bücher.example", "is not ASCII; write the A-label form 'xn--bcher-kva.example'"),
    ("bare_newline", "strip", "is not one of reject, normalize"),
    ("tls_required", "maybe", "is not one of 1, 0, yes, no, true, false, on, off"),
    ("smtpgreeting", "hello\x07there", "holds a control character"),
    ("spool_dir", "./no-such-spool", "is not a directory"),
    ("tls_cert", "./no-such-cert.pem", "is not a file"),
]


@pytest.mark.parametrize(("name", "value", "problem"), BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_check_refuses_a_bad_value_naming_the_file_the_line_and_the_value(
    tmp_path, name, value, problem
):
    # a comment and a blank line first: the line number is the value's, not the file's first
    directory = config_dir(tmp_path, {name: f"# {name}\n\n{value}\n"})
    result = check(tmp_path, directory)
    assert result.returncode == 1
    assert result.stdout == ""
    where = f"line 3 of {directory / name}"
    assert result.stderr.startswith(f"error: {name}: {value!r} {problem}")
    assert result.stderr.endswith(f" ({where})\n") and result.stderr.count("\n") == 1


def test_every_problem_is_reported_at_once(tmp_path):
    directory = config_dir(tmp_path, {"timeout": "-5\n", "loglevel": "6\n", "max_rcpt": "x\n"})
    result = check(tmp_path, directory)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: timeout: '-5' is negative (line 1 of {directory / 'timeout'})",
        f"error: loglevel: '6' is not one of debug, info, warn, warning, error, critical "
        f"(line 1 of {directory / 'loglevel'})",
        f"error: max_rcpt: 'x' is not a whole number (line 1 of {directory / 'max_rcpt'})",
    ]


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    directory = config_dir(tmp_path, {})
    (directory / "rcpthosts").write_bytes(b"mx.test\nb\xfccher.example\n")
    result = check(tmp_path, directory)
    assert result.returncode == 1
    assert result.stderr == (
        f"error: rcpthosts: line 2 of {directory / 'rcpthosts'} is not UTF-8 text (byte 0xfc)\n"
    )


def test_hostname_option_is_checked_as_me(tmp_path):
    result = check(tmp_path, config_dir(tmp_path, {}), "--hostname", "mx example")
    assert result.returncode == 1
    assert "me: 'mx example' is not a domain name" in result.stderr
    assert "(the command line)" in result.stderr


# -- warnings -----------------------------------------------------------------------------
def test_warnings_for_an_unread_file_a_plugin_file_without_its_plugin_and_no_queue(tmp_path):
    directory = config_dir(
        tmp_path,
        {
            "plugins": "rcpt_ok\n",
            "databytez": "1000\n",
            "relayclients": "192.0.2.0/24\n",
            "badmailfrom": "spam@example.org\n",
            "timeout": "60\n30\n",
            ".hidden": "editor state\n",
        },
    )
    result = check(tmp_path, directory)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "OK"
    assert sorted(result.stderr.splitlines()) == sorted([
        f"warning: timeout: only the first value is used, '30' "
        f"(line 2 of {directory / 'timeout'}) is ignored",
        "warning: plugins: no plugin answers the queue hook, so every message gets 451 4.3.0 "
        "and none is stored (add queue/maildir, queue/smtp_forward, ...)",
        "warning: badmailfrom: only the badmailfrom plugin reads this file, and it is not in "
        "plugins",
        "warning: databytez: no setting of that name, the file is not read; did you mean "
        "databytes?",
        "warning: relayclients: the relay plugin is not in plugins, so these clients may not "
        "relay (they are only exempt from the connection limits)",
    ])  # fmt: skip


def test_files_a_plugin_declares_or_names_are_not_unread(tmp_path):
    module = tmp_path / "pythonpath" / "ownfiles.py"
    module.parent.mkdir()
    module.write_text(
        "from qpconn.plugins import Plugin\n\n"
        "class Policy(Plugin):\n"
        "    config_files = ('mypolicy',)\n\n"
        "    def register(self, *args):\n"
        "        self.rules = self.config.lines('mypolicy')\n"
    )
    directory = config_dir(
        tmp_path,
        {
            "plugins": "ownfiles:Policy\nauth/flat_file users\nrcpt_ok\nqueue/maildir ./store\n",
            "mypolicy": "strict\n",
            "users": f"someone:{hash_password('secret', log2n=4)}\n",
        },
    )
    env = {**os.environ, "PYTHONPATH": str(module.parent)}
    command = [sys.executable, "-m", "qpconn", "check", "--config", str(directory)]
    result = subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# -- the three paths agree ----------------------------------------------------------------
def twistd(tmp_path: Path, directory: Path) -> subprocess.CompletedProcess[str]:
    listen = "tcp:0:interface=127.0.0.1"
    command = twistd_command("qpconn", "--config", str(directory), "--listen", listen)
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_twistd_refuses_what_check_refuses_in_two_lines_without_usage(tmp_path):
    directory = config_dir(tmp_path, {"timeout": "-5\n"})
    result = twistd(tmp_path, directory)
    assert result.returncode == 1
    assert (result.stdout + result.stderr).splitlines() == [
        f"twistd qpconn: error: timeout: '-5' is negative (line 1 of {directory / 'timeout'})",
        "twistd qpconn: see 'twistd qpconn --help' for the options",
    ]
    assert not (tmp_path / "store").exists()  # nothing was built


def test_twistd_reports_a_plugin_that_cannot_load_the_same_short_way(tmp_path):
    directory = config_dir(tmp_path, {"plugins": "no_such_plugin\n"})
    result = twistd(tmp_path, directory)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 2 and lines[0].startswith("twistd qpconn: error: plugin no_such_plugin")


def wait_for_count(server: Any, text: str, count: int) -> str:
    """The log once ``text`` is in it ``count`` times (bounded: 30 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log = server.log()
        if log.count(text) >= count:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged {count} times:\n{server.log()}")


def test_reload_refuses_what_check_refuses_and_applies_a_good_loglevel(
    qpconn_start,  # noqa: F811
    tmp_path,
):
    directory = config_dir(tmp_path, {})
    server = qpconn_start(directory)
    bad = [("loglevel", "6", BAD[4][2]), ("timeout", "-5", "is negative")]
    for count, (name, value, problem) in enumerate(bad, 1):
        (directory / name).write_text(f"{value}\n")
        server.reload()
        log = wait_for_count(server, "reload refused", count)
        where = f"line 1 of {directory / name}"
        assert (
            f"reload refused, keeping the running configuration: {name}: {value!r} {problem} "
            f"({where})" in log
        )
        (directory / name).unlink()
    # A good level is taken by the reload itself (it once applied only at start-up), and
    # the reload logs the validator's warnings as the start-up does.
    (directory / "loglevel").write_text("error\n")
    (directory / "databytez").write_text("1\n")
    server.reload()
    server.wait_for_log("config: databytez: no setting of that name")
    with Client(server.address) as client:
        assert client.greeting.code == 220
        client.cmd("QUIT")
    (directory / "timeout").write_text("soon\n")  # an error is logged at any level: a marker
    server.reload()
    log = wait_for_count(server, "reload refused", len(bad) + 1)
    assert "timeout: 'soon' is not a number" in log
    after_reload = log[log.index("config: databytez") :]
    assert "connect from" not in after_reload


# -- values at the edges of their ranges serve sessions ------------------------------------
def edge_values() -> list[tuple[str, str]]:
    """For each number setting, the smallest value it accepts and the largest."""
    values = []
    for setting in SETTINGS.values():
        if setting.kind == "count":
            values += [(setting.name, "0"), (setting.name, "1000000")]
        elif setting.kind == "seconds":
            values.append((setting.name, "86400"))
            if not setting.exclusive:
                values.append((setting.name, "0"))
    return values


@pytest.mark.parametrize(("name", "value"), edge_values(), ids=lambda v: str(v))
@pytest_twisted.ensureDeferred
async def test_what_check_accepts_serves_a_session(qpconn_server, tmp_path, name, value):
    directory = config_dir(tmp_path, {name: f"{value}\n"})
    built = build(str(directory))  # what check and a reload run
    # (a plugin's setting warns that its plugin is not listed: that is the point of it)
    unread = "is not in plugins"
    assert not [w for w in built.warnings if w.startswith(name) and unread not in w]
    server = qpconn_server(files={name: f"{value}\n"})

    def client() -> list[int]:
        with Client(server.address) as smtp:
            codes = [smtp.greeting.code, smtp.cmd("EHLO client.test").code]
            codes.append(smtp.cmd("MAIL FROM:<a@example.org>").code)
            codes.append(smtp.cmd("QUIT").code)
            return codes

    assert await in_thread(client) == [220, 250, 250, 221]


def test_the_validator_runs_before_the_factory_reads_anything(tmp_path):
    from qpconn.server.factory import SMTPFactory
    from qpconn.server.peerinfo import LookupSettings

    directory = config_dir(tmp_path, {"shutdown_timeout": "-1\n"})
    with pytest.raises(CheckError, match="shutdown_timeout: '-1' is negative"):
        build(str(directory))
    with pytest.raises(ValueError, match="shutdown_timeout: '-1' is negative"):
        SMTPFactory(Config(directory), [], lookups=LookupSettings(rdns=False))


# -- the table, the code and the docs agree -------------------------------------------------
def test_every_setting_is_in_the_validator_the_code_and_the_docs():
    assert set(SETTINGS) == set(settings_table()) == settings_read_by_code()


def test_the_validators_defaults_are_the_documented_ones():
    for name, cell in settings_table().items():
        default = SETTINGS[name].default
        if cell == "none":
            assert default is None, name
        elif cell.startswith("`") and cell.endswith("`") and cell.count("`") == 2:
            assert ticked(cell) == [default], name
        else:  # described in words ("the `timeout` value"): no single default value
            assert default is None or name == "rcpthosts", name


def test_the_built_in_defaults_pass_without_warnings(tmp_path: Any):
    assert validate(Config(None)) == []
