"""``python -m qpconn check --config DIR``, run as an administrator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PLUGINS_MODULE = textwrap.dedent(
    """
    from qpconn.plugins import Plugin

    class Gate(Plugin):
        def hook_connect(self, transaction):
            return None

        def hook_rcpt(self, transaction, recipient, params):
            return None

    class Judge(Plugin):
        def register(self, *args):
            if args and args[0] not in ("strict", "lax"):
                raise ValueError(f"mode must be strict or lax, not {args[0]!r}")
            self.mode = args[0] if args else "lax"

        def hook_mail(self, transaction, sender, params):
            return None

        def hook_rcpt(self, transaction, recipient, params):
            return None
    """
)


def check(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pythonpath").mkdir(exist_ok=True)
    (tmp_path / "pythonpath" / "checkplugs.py").write_text(PLUGINS_MODULE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pythonpath")}
    return subprocess.run(
        [sys.executable, "-m", "qpconn", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def config(tmp_path):
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "me").write_text("mx.example.net\n")
    (directory / "plugins").write_text(
        "checkplugs:Gate\ncheckplugs:Judge strict\n# a comment\nqueue/maildir ./store\n"
    )
    return directory


def test_check_prints_the_plugins_of_every_hook_in_order(tmp_path, config):
    result = check(tmp_path, "check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"config: {config}",
        "me: mx.example.net",
        "plugins:",
        "  1. checkplugs:Gate",
        "  2. checkplugs:Judge strict",
        "  3. queue/maildir ./store",
        "hooks:",
        "  connect: checkplugs:Gate",
        "  mail: checkplugs:Judge",
        "  rcpt: checkplugs:Gate, checkplugs:Judge",
        "  queue: queue/maildir",
        "OK",
    ]
    assert result.stderr == ""


def test_check_without_a_directory_describes_the_built_in_defaults(tmp_path):
    result = check(tmp_path, "check", "--hostname", "mx.test")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["config: (built-in defaults)", "me: mx.test"]
    assert "  4. queue/maildir ./maildir" in lines
    assert "  queue: queue/maildir" in lines


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param(
            {"plugins": "no_such_plugin\n"}, "plugin no_such_plugin: no such plugin", id="unknown"
        ),
        pytest.param(
            {"plugins": "checkplugs:Judge harsh\n"},
            "mode must be strict or lax, not 'harsh'",
            id="bad-argument",
        ),
        pytest.param({"databytes": "lots\n"}, "databytes: 'lots' is not a whole number", id="int"),
        pytest.param({"timeout": "soon\n"}, "timeout: 'soon' is not a number", id="float-setting"),
    ],
)
def test_check_fails_with_the_reason_and_status_1(tmp_path, config, files, message):
    for name, text in files.items():
        (config / name).write_text(text)
    result = check(tmp_path, "check", "--config", str(config))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_check_fails_on_a_missing_directory(tmp_path):
    result = check(tmp_path, "check", "--config", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert "does not exist" in result.stderr


def test_unknown_command_prints_usage_with_status_2(tmp_path):
    result = check(tmp_path, "frobnicate")
    assert result.returncode == 2
    assert "check" in result.stderr


def test_the_example_in_running_md_is_what_check_prints(tmp_path):
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "running.md").read_text()
    section = text[text.index("### Checking a config directory") :]
    example = section.split("```\n", 3)[2].split("```")[0].splitlines()
    config = tmp_path / "config"
    config.mkdir()
    plugins = [line.split(". ", 1)[1] for line in example if line.startswith("  ") and ". " in line]
    maildir = str(tmp_path / "mail")
    plugins = [line.replace("/var/mail/qpconn", maildir) for line in plugins]
    (config / "plugins").write_text("\n".join(plugins) + "\n")
    (config / "me").write_text("mx.example.com\n")
    result = check(tmp_path, "check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    expected = [line.replace("/etc/qpconn", str(config)).replace("/var/mail/qpconn", maildir)
                for line in example]  # fmt: skip
    assert result.stdout.splitlines() == expected
