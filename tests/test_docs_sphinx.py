"""docs/ builds with Sphinx, warnings as errors, as CI builds it (the ``docs`` extra).

Every page must be in the table of contents, every link between pages must reach a page
and a heading that exist, and the API page's autodoc directives must find the documented
classes: any of these failing is a Sphinx warning, and ``-W`` makes it an error.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

#: what api.md must describe: the plugin author's, the handler subclasser's, the .tac
#: writer's and the plugin tester's names
PUBLIC_API = [
    "qpconn.hooks.plugin.Plugin", "qpconn.hooks.plugin.Plugin.register",
    "qpconn.hooks.plugin.Plugin.register_hook", "qpconn.hooks.plugin.Plugin.server",
    "qpconn.hooks.plugin.load_plugin", "qpconn.hooks.results.Result",
    "qpconn.hooks.results.Result.DENY", "qpconn.hooks.results.HookOutcome",
    "qpconn.hooks.results.reply_for", "qpconn.hooks.types.HookResult",
    "qpconn.hooks.types.Params", "qpconn.hooks.types.HookSignatures",
    "qpconn.hooks.types.HookSignatures.hook_rcpt", "qpconn.hooks.runner.HookRunner",
    "qpconn.hooks.runner.HookRunner.run", "qpconn.kit.threads.run_in_pool",
    "qpconn.mail.connection.Connection", "qpconn.mail.transaction.Transaction",
    "qpconn.mail.address.Address", "qpconn.mail.header.Header", "qpconn.mail.header.Header.add",
    "qpconn.config.Config", "qpconn.config.Config.lines", "qpconn.core.reply.Reply",
    "qpconn.smtp.context.CommandContext", "qpconn.smtp.context.CommandContext.run_hook",
    "qpconn.smtp.commands.SMTPCommands", "qpconn.smtp.commands.SMTPCommands.ehlo_lines",
    "qpconn.smtp.commands.SMTPCommands.smtp_RCPT", "qpconn.smtp.lmtp.LMTPCommands",
    "qpconn.server.protocol.SMTPServerProtocol", "qpconn.app.service.make_service",
    "qpconn.app.metrics.metrics_service", "qpconn.app.reload.ReloadOnSignal",
    "qpconn.testing.run_session", "qpconn.testing.send_message", "qpconn.testing.Harness",
    "qpconn.testing.SessionResult", "qpconn.testing.SessionResult.connection",
    "qpconn.testing.TransactionRecord", "qpconn.testing.DNSTable",
    "qpconn.testing.pytest_plugin.qpconn_start", "qpconn.testing.pytest_plugin.qpconn_address",
    "qpconn.testing.pytest_plugin.qpconn_config_dir",
    "qpconn.testing.pytest_plugin.QpconnProcess",
]  # fmt: skip

pytest.importorskip("sphinx", reason="the docs extra (sphinx, myst-parser) is not installed")
pytest.importorskip("myst_parser", reason="the docs extra (sphinx, myst-parser) is not installed")


def build(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
               "-d", str(out / ".doctrees"), str(source), str(out)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def test_docs_build_with_warnings_as_errors(tmp_path):
    done = build(DOCS, tmp_path / "html")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    html = tmp_path / "html"
    for page in ("index", "getting-started", "running", "config", "plugins", "api",
                 "testing", "migrating"):  # fmt: skip
        assert (html / f"{page}.html").is_file(), page
    api = (html / "api.html").read_text()
    # autodoc found the classes and their documented members
    for name in ("qpconn.mail.connection.Connection", "qpconn.mail.transaction.Transaction",
                 "add_recipient", "body_chunks", "remote_host_or_unknown"):  # fmt: skip
        assert name in api, name
    # the whole public API is there, each with its own entry
    described = set(re.findall(r'<dt class="sig sig-object py" id="([^"]+)"', api))
    missing = [name for name in PUBLIC_API if name not in described]
    assert not missing, missing
    # and nothing private: no member whose name starts with "_" (but Notes' call form)
    private = [name for name in described
               if any(part.startswith("_") for part in name.split(".")) and
               name != "qpconn.mail.connection.Notes.__call__"]  # fmt: skip
    assert not private, private


def test_the_documented_build_command_is_the_one_run_here():
    """README.md and docs/getting-started.md give the build command; build() above runs it
    (into a temporary directory instead of docs/_build)."""
    command = ".venv/bin/sphinx-build -W -b html docs docs/_build"
    for page in (DOCS.parent / "README.md", DOCS / "getting-started.md"):
        assert f"pip install -e '.[docs]' && {command}\n" in page.read_text(), page.name


def test_a_broken_link_between_pages_fails_the_build(tmp_path):
    """The check above can fail: a copy of docs/ with one bad heading link does not build."""
    copy = tmp_path / "docs"
    shutil.copytree(DOCS, copy, ignore=shutil.ignore_patterns("_build"))
    page = copy / "migrating.md"
    page.write_text(page.read_text() + "\nSee [nowhere](config.md#no-such-heading).\n")
    done = build(copy, tmp_path / "html")
    assert done.returncode != 0
    assert "no-such-heading" in done.stdout + done.stderr
