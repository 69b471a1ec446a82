"""SIGHUP reloads the config directory of a running ``twistd qpconn``."""

from __future__ import annotations

import signal
import smtplib
import urllib.request

import pytest
import pytest_twisted

from qpconn.testing.pytest_plugin import qpconn_start  # noqa: F401 - the fixture
from tests.support.nexthop import Recorder, aiosmtpd_next_hop
from tests.support.process import free_port
from tests.support.server import in_thread
from tests.support.timing import wait_until


def write(directory, **files: str) -> None:
    for name, text in files.items():
        (directory / name).write_text(text)


@pytest.fixture
def config(tmp_path):
    directory = tmp_path / "config"
    directory.mkdir()
    write(
        directory,
        me="mx.test\n",
        rcpthosts="mx.test\n",
        smtpgreeting="first set\n",
        badmailfrom="spam@example.org\n",
        plugins="rcpt_ok\nqueue/maildir ./store\n",
    )
    return directory


def connect(address: tuple[str, int]) -> tuple[smtplib.SMTP, bytes]:
    smtp = smtplib.SMTP(timeout=10)
    code, text = smtp.connect(*address)
    assert code == 220
    smtp.ehlo("client.test")
    return smtp, text


def test_sighup_new_sessions_get_the_new_set_sessions_in_flight_keep_theirs(
    qpconn_start, config, tmp_path  # noqa: F811
):
    metrics_port = free_port()
    server = qpconn_start(config, "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1")
    old, banner = connect(server.address)
    assert banner.startswith(b"first set")

    plugins = "badmailfrom\nrcpt_ok\nqueue/maildir ./store\n"
    write(config, smtpgreeting="second set\n", plugins=plugins)
    server.reload()
    log = server.wait_for_log("reloaded ")
    assert f"reloaded {config}: 3 plugins (badmailfrom rcpt_ok queue/maildir)" in log

    new, banner = connect(server.address)
    assert banner.startswith(b"second set")
    assert new.mail("spam@example.org")[0] == 550
    new.quit()

    # The session that started before the reload finishes with the plugins it started with.
    assert old.mail("spam@example.org")[0] == 250
    assert old.rcpt("user@mx.test")[0] == 250
    assert old.data(b"Subject: in flight\r\n\r\nbody\r\n")[0] == 250
    old.quit()
    assert len(list((tmp_path / "store" / "new").iterdir())) == 1

    # The metrics carry on across the reload and see the new plugin.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    assert 'qpconn_hook_results_total{hook="mail",plugin="badmailfrom",result="DENY"} 1.0' in text
    # the start-up probe and the two sessions (at least: one probe per start attempt)
    (total,) = [line for line in text.splitlines() if line.startswith("qpconn_connections_total")]
    assert float(total.split()[1]) >= 3


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        pytest.param(
            {"plugins": "no_such_plugin\n"}, "plugin no_such_plugin: no such plugin", id="plugin"
        ),
        pytest.param({"databytes": "huge\n"}, "databytes: 'huge' is not a whole number", id="int"),
    ],
)
def test_a_bad_config_is_refused_with_its_reason_and_the_old_one_stays(
    qpconn_start, config, files, reason  # noqa: F811
):
    write(config, plugins="badmailfrom\nrcpt_ok\nqueue/maildir ./store\n")
    server = qpconn_start(config)
    write(config, smtpgreeting="never used\n", **files)
    server.reload()
    log = server.wait_for_log("reload refused")
    assert f"reload refused, keeping the running configuration: {reason}" in log
    assert server.process.poll() is None

    smtp, banner = connect(server.address)
    assert banner.startswith(b"first set")  # the running config, not the half-edited one
    assert smtp.mail("spam@example.org")[0] == 550
    smtp.quit()

    # Once the directory is fixed, the next SIGHUP takes it.
    write(config, plugins="rcpt_ok\nqueue/maildir ./store\n", databytes="1000\n")
    server.reload()
    server.wait_for_log("reloaded ")
    smtp, banner = connect(server.address)
    assert banner.startswith(b"never used")
    assert smtp.mail("spam@example.org")[0] == 250
    smtp.quit()


def test_a_frozen_config_ignores_later_edits_and_new_files(tmp_path):
    from qpconn.config import Config, ConfigError

    (tmp_path / "timeout").write_text("60\n")
    (tmp_path / "blob").write_bytes(b"\xff\xfe not text")
    config = Config(tmp_path)
    config.freeze()
    (tmp_path / "timeout").write_text("5\n")
    (tmp_path / "smtpgreeting").write_text("new file\n")
    assert config.get("timeout") == "60"
    assert config.get("smtpgreeting") is None
    assert Config(tmp_path).get("smtpgreeting") == "new file"  # an unfrozen one reads it
    # not text: read (and refused, naming the file and the line) when asked for
    with pytest.raises(ConfigError, match=r"blob: line 1 of .*blob is not UTF-8 text"):
        config.lines("blob")


@pytest_twisted.ensureDeferred
async def test_the_tac_recipe_reloads_on_sighup_in_process(tmp_path, config):
    """docs/running.md's .tac lines: ReloadOnSignal and metrics_service on make_service."""
    import os
    import signal

    from qpconn.app.metrics import metrics_service
    from qpconn.app.reload import ReloadOnSignal
    from qpconn.app.service import make_service

    top = make_service(["tcp:0:interface=127.0.0.1"], str(config))
    top.factory.config.freeze()
    ReloadOnSignal(top.factory).setServiceParent(top)
    metrics_service("tcp:0:interface=127.0.0.1", top.factory, top)
    before = signal.getsignal(signal.SIGHUP)
    top.startService()
    try:
        old_runner = top.factory.runner
        write(config, plugins="badmailfrom\nrcpt_ok\nqueue/maildir ./store\n")
        os.kill(os.getpid(), signal.SIGHUP)
        # the handler hands the reload to the reactor
        assert await in_thread(wait_until, lambda: top.factory.runner is not old_runner)
        assert [p.name for p in top.factory.plugins] == ["badmailfrom", "rcpt_ok", "queue/maildir"]
        assert top.factory.runner.observer is not None  # metrics carried over
    finally:
        await top.stopService()
    assert signal.getsignal(signal.SIGHUP) is before


class QuitRecorder(Recorder):
    """A next hop that also notes each QUIT: a pooled connection being let go."""

    async def handle_QUIT(self, server, session, envelope):
        self.commands.append("QUIT")
        return "221 Bye"


def test_a_reload_detaches_the_replaced_plugins_once_their_last_session_ends(
    qpconn_start, config  # noqa: F811
):
    """The forwarding pool of the replaced set carries the in-flight session's message,
    then is closed (its idle connection QUIT) when that session ends; without detach every
    reload left the old pool's connections open for the life of the process."""
    with aiosmtpd_next_hop(QuitRecorder()) as (hop, controller):
        write(config, plugins=f"rcpt_ok\nqueue/smtp-forward 127.0.0.1 {controller.port}\n")
        server = qpconn_start(config)

        def send(smtp: smtplib.SMTP, subject: str) -> None:
            smtp.sendmail("a@example.org", ["user@mx.test"], f"Subject: {subject}\r\n\r\nx\r\n")

        old, _ = connect(server.address)
        send(old, "before")  # the old set's pool now holds one idle connection
        assert len(hop.hellos) == 1

        server.reload()
        server.wait_for_log("reloaded ")
        new, _ = connect(server.address)
        send(new, "new set")  # a new plugin, a new pool: a second connection to the hop
        assert len(hop.hellos) == 2
        new.quit()
        send(old, "in flight")  # the old session keeps its set, and reuses its pool
        assert len(hop.hellos) == 2
        assert "QUIT" not in hop.commands  # the old set is still in use: nothing let go

        old.quit()
        log = server.wait_for_log("plugins a reload replaced")
        assert "detaching the 2 plugins a reload replaced (rcpt_ok queue/smtp-forward)" in log
        wait_until(lambda: hop.commands.count("QUIT") == 1, timeout=20)
        assert len(hop.messages) == 3

        # At shutdown (twistd ends on the signal it got) the running set lets its pool go too.
        assert server.stop() == -signal.SIGTERM
        wait_until(lambda: hop.commands.count("QUIT") == 2, timeout=20)
