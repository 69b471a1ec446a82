"""Code written against qpconn 0.1's module paths keeps working after the subpackage layout.

Two promises: every old module path imports as the *same* module object as its new home
(``qpconn.moved``), and a plugin written the way the 0.1 documentation showed it -- old
imports, old names -- loads from a config directory and runs through a real server.
"""

from __future__ import annotations

import importlib
import smtplib
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted

from qpconn.moved import MOVED
from tests.support.server import in_thread, start_server


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_is_the_new_module(old):
    module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert sys.modules[old] is module
    assert module.__name__ == MOVED[old]  # the module still knows where it lives


def test_names_of_modules_that_became_packages_still_import():
    from qpconn.hooks import HookRunner
    from qpconn.hooks.runner import HookRunner as real_runner
    from qpconn.smtp import HandlerResult, SMTPCommands
    from qpconn.smtp.commands import HandlerResult as real_result
    from qpconn.smtp.commands import SMTPCommands as real_commands

    assert HookRunner is real_runner
    assert SMTPCommands is real_commands and HandlerResult is real_result
    with pytest.raises(AttributeError):
        importlib.import_module("qpconn.smtp").NoSuchThing  # noqa: B018


def test_old_paths_work_in_a_fresh_interpreter():
    """The finder is installed by ``import qpconn`` itself, not by a test's earlier import."""
    code = (
        "import qpconn.results, qpconn.address, qpconn.service, qpconn.logs, "
        "qpconn.server.prefork\n"
        "from qpconn.lmtp import set_recipient_reply\n"
        "print(qpconn.results.__name__, qpconn.logs.json_file.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["qpconn.hooks.results", "qpconn.log.observers"]


OLD_STYLE_PLUGIN = textwrap.dedent(
    '''
    """A plugin written against qpconn 0.1's documented module paths."""
    from qpconn import DECLINED, DENY
    from qpconn.address import Address
    from qpconn.plugins import Plugin
    from qpconn.results import OK, Result


    class Plugin01(Plugin):
        def hook_mail(self, transaction, sender, params):
            assert isinstance(sender, Address)
            if sender.format() == "<blocked@example.org>":
                return DENY, "5.7.1 old-style plugin says no"
            transaction.notes["old_style"] = Result.OK is OK
            return DECLINED

        def hook_data_post(self, transaction):
            transaction.header.add("X-Old-Style", str(transaction.notes["old_style"]))
            return DECLINED
    '''
)


@pytest_twisted.ensureDeferred
async def test_plugin_written_against_the_old_paths_runs_in_a_real_server(
    tmp_path, monkeypatch
):
    package = tmp_path / "site" / "oldstyle"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "plugin01.py").write_text(OLD_STYLE_PLUGIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(package.parent))
    maildir = tmp_path / "maildir"
    running = start_server(
        tmp_path,
        files={"plugins": ["oldstyle.plugin01", "relay", "rcpt_ok", f"queue/maildir {maildir}"]},
    )
    try:

        def client() -> tuple[object, int]:
            with smtplib.SMTP(*running.address) as smtp:
                body = b"Subject: x\r\n\r\nhi\r\n"
                accepted = smtp.sendmail("me@example.org", ["you@mx.test"], body)
                code, _ = smtp.mail("blocked@example.org")
                return accepted, code

        accepted, refused_code = await in_thread(client)
    finally:
        await running.stop()
    assert accepted == {}
    assert refused_code == 550
    (message,) = running.messages()
    assert b"X-Old-Style: True" in message
