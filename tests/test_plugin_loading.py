"""How a `config/plugins` line becomes a plugin: shipped names, dotted paths, entry points."""

from __future__ import annotations

import smtplib
import textwrap

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin, resolve
from qpconn.plugins.count_unrecognized_commands import CountUnrecognizedCommands
from qpconn.plugins.queue.maildir import Maildir
from tests.support.server import in_thread


def test_shipped_names_map_slashes_and_dashes_to_modules():
    assert resolve("queue/maildir") is Maildir
    assert resolve("count-unrecognized-commands") is CountUnrecognizedCommands


def test_unknown_plugin_names_the_module_it_looked_for():
    with pytest.raises(PluginLoadError, match=r"qpconn\.plugins\.no_such_thing"):
        resolve("no_such_thing")


def test_bad_arguments_are_refused_at_load_time(tmp_path):
    with pytest.raises(PluginLoadError, match="count_unrecognized_commands"):
        load_plugin(Config(tmp_path), "count_unrecognized_commands", "many")


def _write_package(root, name, body, module="__init__"):
    package = root / name
    package.mkdir(exist_ok=True)
    (package / "__init__.py").touch()
    (package / f"{module}.py").write_text(textwrap.dedent(body))


SHOUT = '''
from qpconn import DENY
from qpconn.plugins import Plugin

class Shout(Plugin):
    def register(self, word="NO"):
        self.word = word

    def hook_mail(self, transaction, sender, params):
        return DENY, f"5.7.1 {self.word}"
'''


def test_dotted_module_and_module_colon_class(tmp_path, monkeypatch):
    _write_package(tmp_path, "shoutpkg", SHOUT, module="loud")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve("shoutpkg.loud").__name__ == "Shout"
    assert resolve("shoutpkg.loud:Shout").__name__ == "Shout"


def test_a_bare_word_is_a_shipped_plugin_or_an_entry_point_never_a_top_level_module(
    tmp_path, monkeypatch
):
    _write_package(tmp_path, "toplevelshout", SHOUT)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginLoadError, match="no such plugin"):
        resolve("toplevelshout")


def test_module_with_two_plugin_classes_must_say_which(tmp_path, monkeypatch):
    _write_package(tmp_path, "twopkg", SHOUT + "\nclass Whisper(Shout):\n    pass\n", "mod")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginLoadError, match="plugin_class"):
        resolve("twopkg.mod")


@pytest_twisted.ensureDeferred
async def test_entry_point_name_in_the_plugins_file_loads_a_third_party_plugin(
    qpconn_server, tmp_path, monkeypatch
):
    site = tmp_path / "site"
    site.mkdir()
    _write_package(site, "thirdparty_shout", SHOUT)
    info = site / "thirdparty_shout-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-shout\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qpconn.plugins]\nshout = thirdparty_shout:Shout\n")
    monkeypatch.syspath_prepend(str(site))
    server = qpconn_server(files={"plugins": ["shout LOUDLY", "rcpt_ok"]})

    def client():
        with smtplib.SMTP(*server.address) as smtp:
            smtp.ehlo("client.test")
            return smtp.mail("a@example.org")

    assert await in_thread(client) == (550, b"5.7.1 LOUDLY")
