"""The reference tables in docs/ against the code, so the docs cannot drift unnoticed."""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted

from qpconn.app.options import Options
from qpconn.config import Config
from qpconn.hooks.results import HookOutcome, Result, reply_for
from qpconn.plugins import HOOKS
from qpconn.server.factory import SMTPFactory
from qpconn.server.peerinfo import LookupSettings
from qpconn.server.tlscontext import read_tls_policy
from tests.support.server import in_thread

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# Where the handler, not the table, makes the reply (documented in their own sections).
NOT_IN_TABLE = {("queue", Result.OK), ("quit", Result.DENY), ("quit", Result.DENYSOFT),
                ("quit", Result.DENY_DISCONNECT), ("quit", Result.DENYSOFT_DISCONNECT)}  # fmt: skip


def read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def between(text: str, start: str, end: str) -> str:
    begin = text.index(start) + len(start)
    return text[begin : text.index(end, begin)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of the markdown tables in ``text``."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:] if rows else rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


# -- plugins.md ---------------------------------------------------------------------------
def reply_table() -> dict[tuple[str, Result], tuple[str, bool]]:
    section = between(read("plugins.md"), "<!-- reply-table", "<!-- /reply-table -->")
    documented = {}
    for hooks, results, reply, then in table_rows(section):
        (text,) = ticked(reply)
        for hook in ticked(hooks):
            for result in ticked(results):
                key = (hook, Result[result])
                assert key not in documented, f"{key} listed twice"
                documented[key] = (text, then == "closes")
    return documented


def test_reply_table_matches_reply_for():
    for (hook, result), (text, closes) in reply_table().items():
        decided = reply_for(hook, HookOutcome(result))
        assert decided is not None, f"{hook} {result.name}: documented, but decides nothing"
        reply, close = decided
        assert reply.to_bytes() == f"{text}\r\n".encode(), (hook, result.name)
        assert close is closes, (hook, result.name)


def test_reply_table_lists_every_decision():
    documented = reply_table()
    for hook in HOOKS:
        for result in Result:
            decides = reply_for(hook, HookOutcome(result)) is not None
            if decides and result is not Result.DONE and (hook, result) not in NOT_IN_TABLE:
                assert (hook, result) in documented, f"{hook} {result.name} not documented"


def test_every_hook_has_a_section():
    headings = [line for line in read("plugins.md").splitlines() if line.startswith("### ")]
    for hook in HOOKS:
        assert any(f"`{hook}`" in line for line in headings), hook


# -- config.md ----------------------------------------------------------------------------
def settings_table() -> dict[str, str]:
    section = between(read("config.md"), "## Settings", "\n## ")
    return {ticked(name)[0]: default for name, default, _ in table_rows(section)}


def settings_read_by_code() -> set[str]:
    pattern = re.compile(r"config\.(?:get|lines|get_int|get_float)\(\s*\"([a-z0-9_]+)\"")
    names = {"plugins", "me"}  # read through Config.plugin_lines() and Config.me
    for path in (REPO / "qpconn").rglob("*.py"):
        names.update(pattern.findall(path.read_text(encoding="utf-8")))
    return names


def test_every_setting_the_code_reads_is_documented_and_nothing_else():
    assert set(settings_table()) == settings_read_by_code()


def test_documented_defaults_are_the_effective_ones(tmp_path):
    config = Config(None)
    factory = SMTPFactory(config, [], lookups=LookupSettings(rdns=False))
    tls = read_tls_policy(config)
    effective = {
        "databytes": factory.databytes,
        "timeout": factory.timeout,
        "plugin_timeout": factory.runner.timeout,
        "size_threshold": factory.size_threshold,
        "dns_timeout": factory.lookups.dns_timeout,
        "ident_timeout": factory.lookups.ident_timeout,
        "proxy_timeout": factory.proxy.timeout,
        "rcpthosts": "localhost",
        "tls_min_version": tls.min_version,
        "tls_ciphers": tls.ciphers,
        "tls_session_timeout": tls.session_timeout,
    }
    for name, default in settings_table().items():
        if default == "none":
            assert config.lines(name) == [], name
        elif name in effective:
            (value,) = ticked(default)
            assert str(effective[name]) in (value, f"{value}.0"), name
    assert factory.spool_dir is None
    listed = between(read("config.md"), "The default `plugins` list:\n\n```\n", "```")
    assert listed.splitlines() == config.lines("plugins")


def test_every_shipped_plugin_is_documented():
    text = read("config.md")
    root = REPO / "qpconn" / "plugins"
    for path in root.rglob("*.py"):
        if path.name != "__init__.py":
            name = path.relative_to(root).with_suffix("").as_posix()
            assert f"### `{name}" in text, name


# -- running.md ---------------------------------------------------------------------------
def test_every_twistd_option_is_documented():
    text = read("running.md")
    options = Options()
    names = [p[0] for p in options.optParameters] + [f[0] for f in options.optFlags]
    names += [name[4:].replace("_", "-") for name in dir(options) if name.startswith("opt_")]
    for name in set(names) - {"help", "version"}:
        assert f"`--{name}" in text, name


# -- the complete example in plugins.md ---------------------------------------------------
@pytest.fixture
def badmailfrom_module(tmp_path, monkeypatch):
    code = between(read("plugins.md"), "<!-- example: badmailfrom -->\n```python\n", "```")
    package = tmp_path / "pythonpath" / "mycompany"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "badmailfrom.py").write_text(code)
    monkeypatch.syspath_prepend(str(package.parent))
    yield "mycompany.badmailfrom"
    for name in ("mycompany.badmailfrom", "mycompany"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)


@pytest_twisted.ensureDeferred
async def test_complete_example_refuses_listed_senders_and_adds_its_header(
    qpconn_server, tmp_path, badmailfrom_module
):
    server = qpconn_server(
        files={"badmailfrom": ["spammer@example.net", "@junk.example"]},
        plugins=[badmailfrom_module, "rcpt_ok", f"queue/maildir {tmp_path / 'maildir'}"],
    )

    def client():
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            smtp.ehlo("client.test")
            refused = [smtp.mail(sender) for sender in ("Spammer@example.net", "x@junk.example")]
            smtp.rset()
            smtp.sendmail("friend@example.org", ["user@mx.test"], b"Subject: hi\r\n\r\nhi\r\n")
            return refused

    assert await in_thread(client) == [(550, b"5.7.1 Mail from this sender is not accepted")] * 2
    (message,) = server.messages()
    head = message.partition(b"\n\n")[0]
    assert head.endswith(b"\nX-Peer: unknown [127.0.0.1] verified=no")


# -- "Testing a plugin" in plugins.md, run as a plugin author runs it --------------------
def test_the_testing_example_passes_under_pytest_with_what_ships(tmp_path):
    """The block imports only what the qpconn package ships (qpconn.testing and its pytest
    fixtures): in a project of its own, next to the complete example as its plugin, it
    passes under pytest, its real-server test against a real ``twistd qpconn``."""
    text = read("plugins.md")
    example = between(text, "<!-- example: badmailfrom -->\n```python\n", "```")
    tests = between(text, "<!-- example: testing-a-plugin -->\n```python\n", "```")
    assert "tests." not in tests  # nothing of this repository's own test suite
    project = tmp_path / "project"
    (project / "mycompany").mkdir(parents=True)
    (project / "mycompany" / "__init__.py").write_text("")
    (project / "mycompany" / "badmailfrom.py").write_text(example)
    (project / "test_badmailfrom.py").write_text(tests)
    env = {**os.environ, "PYTHONPATH": str(project)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_badmailfrom.py"],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_the_run_in_pool_example_refuses_unknown_users(tmp_path):
    """plugins.md's run_in_pool plugin, as written, with its SQLite work done in place (the
    testing kit's inline_pools) so that it runs on the fake clock."""
    import sqlite3

    from qpconn.testing import run_session

    code = between(read("plugins.md"), "### Synchronous libraries: `run_in_pool`", "\n### ")
    code = between(code, "```python\n", "```")
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/plugins.md", "exec"), namespace)
    with sqlite3.connect(tmp_path / "users.db") as db:  # the working directory: tmp_path
        db.execute("CREATE TABLE users (address TEXT)")
        db.execute("INSERT INTO users VALUES ('known@mx.test')")
    script = ["EHLO c.example", "MAIL FROM:<a@example.org>", "RCPT TO:<Known@mx.test>",
              "RCPT TO:<stranger@mx.test>"]  # fmt: skip
    plugins = [namespace["KnownUsers"], "rcpt_ok"]
    result = run_session(plugins, script, inline_pools=("known_users",))
    assert result.codes == [220, 250, 250, 250, 550]
    assert result.replies[-1].text == "no such user"
