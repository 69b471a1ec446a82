"""docs/examples/qpconn-nobounces: a plugin shipped as its own Python package.

tests/test_plugin_loading.py checks that an entry point from a dist-info directory is
found. This goes the whole way a plugin author's user goes: ``pip install`` of the example
package (built by setuptools from its pyproject.toml, offline) into a fresh virtualenv
that has qpconn, then ``python -m qpconn check`` and a real ``twistd qpconn`` in that
virtualenv, loading the plugin by the name its entry point declares: the commands
docs/plugins.md shows for it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import smtplib
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests.support.process import free_port

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "qpconn-nobounces"


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A new virtualenv seeing this one's packages (qpconn, Twisted, pip, setuptools),
    with the example package pip-installed into it alone."""
    if importlib.util.find_spec("wheel") is None:
        pytest.skip("the 'wheel' package (test extra) is needed to build the example offline")
    root = tmp_path_factory.mktemp("plugin-venv")
    home = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True)
    python = home / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # addsitedir (not a bare path) so the editable install of qpconn is honoured too
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib, "qpconn-project.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    source = root / "qpconn-nobounces"  # a copy: a build writes build/ and egg-info there
    shutil.copytree(EXAMPLE, source)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", str(source)],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return python


def test_the_example_package_is_installed_in_the_new_venv_only(venv):
    names = subprocess.run(
        [str(venv), "-c", "from importlib.metadata import entry_points; "
         "print(*sorted(e.name for e in entry_points(group='qpconn.plugins')))"],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert "nobounces" in names
    ours = importlib.metadata.entry_points(group="qpconn.plugins")
    assert "nobounces" not in {entry.name for entry in ours}


def test_check_lists_the_plugin_by_its_entry_point_name_and_refuses_bad_arguments(
    venv, tmp_path
):
    config = tmp_path / "config"
    config.mkdir()
    (config / "plugins").write_text("nobounces postmaster@mx.test\nrcpt_ok\n")
    done = subprocess.run([str(venv), "-m", "qpconn", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1. nobounces postmaster@mx.test" in done.stdout
    assert "rcpt: nobounces, rcpt_ok" in done.stdout

    (config / "plugins").write_text("nobounces postmaster\nrcpt_ok\n")
    done = subprocess.run([str(venv), "-m", "qpconn", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert "not an address: postmaster" in done.stderr


def test_a_server_in_the_new_venv_runs_the_plugin_named_in_config_plugins(venv, tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "me").write_text("mx.test\n")
    (config / "rcpthosts").write_text("mx.test\n")
    (config / "plugins").write_text(
        "nobounces postmaster@mx.test\nrcpt_ok\nqueue/maildir ./store\n"
    )
    port = free_port()
    log = tmp_path / "qpconn.log"
    command = [str(venv), "-c", "from twisted.scripts.twistd import run; run()",
               "-n", "--pidfile=", f"--logfile={log}", "qpconn", "--no-rdns",
               "--listen", f"tcp:{port}:interface=127.0.0.1", "--config", str(config)]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    try:
        smtp = connect(port, process)
        with smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("<>")[0] == 250
            code, text = smtp.rcpt("user@mx.test")
            assert (code, text) == (550, b"5.7.1 we do not accept bounces for this address")
            assert smtp.rcpt("postmaster@mx.test")[0] == 250
            assert smtp.data(b"Subject: delivery failure\r\n\r\nreport\r\n")[0] == 250
            smtp.rset()
            assert smtp.mail("someone@example.org")[0] == 250
            assert smtp.rcpt("user@mx.test")[0] == 250
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert len(os.listdir(tmp_path / "store" / "new")) == 1
    assert "bounce to user@mx.test refused" in log.read_text()


def connect(port: int, process: subprocess.Popen[bytes]) -> smtplib.SMTP:
    """An SMTP client once the server accepts (bounded: 30 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            return smtplib.SMTP("127.0.0.1", port, timeout=10)
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"server did not start: {process.stderr.read().decode()}")
