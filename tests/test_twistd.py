"""``twistd -n qpconn`` started as a separate process, as an administrator would.

Pins what a first run does (mail into ./maildir, a readable log), the config directory and
``--hostname``, the start-up refusals (unknown plugin, malformed or unusable ``--listen``
endpoint), and that ``--listen`` takes any Twisted server endpoint, repeatedly: a ``tcp6:``
listener on ``::1`` and a ``systemd:`` listener on a socket inherited the way systemd hands
one over (``LISTEN_FDS``, ``LISTEN_FDNAMES``, ``LISTEN_PID``, descriptor 3), one message
through each; without ``--listen`` the default is the documented one. (``tcp:`` and ``unix:``
are also exercised by tests/test_docs_running.py, ``ssl:`` by tests/test_e2e_tls.py.)
"""

from __future__ import annotations

import os
import smtplib
import socket
from pathlib import Path

import pytest

from qpconn.app.options import Options
from qpconn.app.service import DEFAULT_LISTEN
from tests.support.process import (
    free_port,
    logged_process,
    running,
    twistd_command,
    wait_for_port,
)


def test_twistd_qpconn_with_defaults_stores_mail_in_working_directory_maildir(tmp_path):
    port = free_port()
    command = twistd_command("qpconn", "--listen", f"tcp:{port}:interface=127.0.0.1")
    with running(command, port, str(tmp_path)), smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        refused = smtp.sendmail(
            "someone@example.org", ["user@localhost"], b"Subject: via twistd\r\n\r\nbody\r\n"
        )
    assert refused == {}
    new = tmp_path / "maildir" / "new"
    (name,) = os.listdir(new)
    message = (new / name).read_bytes()
    assert b"Subject: via twistd" in message
    assert message.endswith(b"\n\nbody\n")
    log = (tmp_path / "server.log").read_text()
    assert " connect from 127.0.0.1:" in log
    assert " accepted from=<someone@example.org> to=<user@localhost>" in log
    assert " disconnect" in log


def test_twistd_qpconn_uses_config_directory_and_hostname_option(tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "rcpthosts").write_text("# our domains\nexample.net\n")
    (config / "plugins").write_text(f"rcpt_ok\nqueue/maildir {tmp_path / 'store'}\n")
    (config / "smtpgreeting").write_text("welcome to the test\n")
    port = free_port()
    command = twistd_command(
        "qpconn",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--config",
        str(config),
        "--hostname",
        "mx.example.net",
    )
    with running(command, port, str(tmp_path)), smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        _, banner = smtp.ehlo("client.test")
        assert banner.startswith(b"mx.example.net ")
        smtp.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\ny\r\n")
        # localhost is not in this rcpthosts file: it is a foreign domain here.
        smtp.mail("a@example.org")
        code, text = smtp.rcpt("b@localhost")
    assert (code, text) == (550, b"5.7.1 Relaying denied")
    assert len(os.listdir(tmp_path / "store" / "new")) == 1
    assert not (tmp_path / "maildir").exists()


def test_twistd_qpconn_refuses_a_config_naming_an_unknown_plugin(tmp_path):
    import subprocess

    config = tmp_path / "config"
    config.mkdir()
    (config / "plugins").write_text("no_such_plugin\n")
    result = subprocess.run(
        twistd_command("qpconn", "--config", str(config), "--listen", "tcp:0:interface=127.0.0.1"),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert b"plugin no_such_plugin: no such plugin" in output
    assert b"Traceback" not in output
    assert not (tmp_path / "maildir").exists()


def test_twistd_qpconn_refuses_a_malformed_listen_endpoint_before_touching_the_disk(tmp_path):
    import subprocess

    result = subprocess.run(
        twistd_command("qpconn", "--listen", "bogus:25"), cwd=tmp_path, capture_output=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert b"Unknown endpoint type: 'bogus'" in output
    assert b"Traceback" not in output
    assert not (tmp_path / "maildir").exists()


def test_twistd_qpconn_refuses_an_ssl_endpoint_whose_key_file_is_missing(tmp_path):
    import subprocess

    missing = tmp_path / "no-such-key.pem"
    result = subprocess.run(
        twistd_command("qpconn", "--listen", f"ssl:0:interface=127.0.0.1:privateKey={missing}"),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert b"No such file or directory" in output and str(missing).encode() in output
    assert b"Traceback" not in output
    assert not (tmp_path / "maildir").exists()


# -- --listen: the default, and endpoints other than tcp: ------------------------------------
def test_default_listen_is_loopback_port_2525():
    assert DEFAULT_LISTEN == "tcp:2525:interface=127.0.0.1"
    options = Options()
    options.parseOptions([])
    assert options["listen"] == [DEFAULT_LISTEN]
    repeated = Options()
    repeated.parseOptions(["--listen", "tcp:1", "--listen", "unix:/tmp/x"])
    assert repeated["listen"] == ["tcp:1", "unix:/tmp/x"]


def _ipv6_loopback_port() -> int | None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
            return sock.getsockname()[1]
    except OSError:
        return None


def _send(host: str, port: int, subject: str) -> dict:
    with smtplib.SMTP(host, port, timeout=20) as smtp:
        smtp.ehlo("client.test")
        return smtp.sendmail(
            "a@example.org", ["user@localhost"], f"Subject: {subject}\r\n\r\nhi\r\n".encode()
        )


def test_twistd_serves_on_tcp6_and_an_inherited_systemd_socket(tmp_path: Path):
    v6_port = _ipv6_loopback_port()
    # The socket systemd would have made and passed as descriptor 3.
    activated = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    activated.bind(("127.0.0.1", 0))
    activated.listen(16)
    systemd_port = activated.getsockname()[1]
    tcp_port = free_port()
    listen = ["--listen", f"tcp:{tcp_port}:interface=127.0.0.1"]
    listen += ["--listen", "systemd:domain=INET:index=0"]
    if v6_port is not None:
        listen += ["--listen", f"tcp6:{v6_port}:interface=\\:\\:1"]
    command = twistd_command("qpconn", *listen)
    # LISTEN_PID must be the server's own pid: the shell sets it to $$ and execs twistd.
    shell = ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh", *command]
    fd = activated.fileno()

    def hand_over() -> None:
        os.dup2(fd, 3)

    with logged_process(
        shell,
        str(tmp_path),
        {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "smtp"},
        # Python's descriptors are not inheritable; the dup2 copy at 3 is, and must stay.
        close_fds=False,
        preexec_fn=hand_over,
    ) as process:
        activated.close()
        wait_for_port(tcp_port, process)
        assert _send("127.0.0.1", systemd_port, "via systemd") == {}
        if v6_port is not None:
            assert _send("::1", v6_port, "via tcp6") == {}
    new = tmp_path / "maildir" / "new"
    subjects = sorted(
        line
        for name in os.listdir(new)
        for line in (new / name).read_bytes().split(b"\n")
        if line.startswith(b"Subject: ")
    )
    expected = [b"Subject: via systemd"] + ([b"Subject: via tcp6"] if v6_port else [])
    assert subjects == expected, (tmp_path / "server.log").read_text()
    if v6_port is None:
        pytest.skip("no IPv6 loopback here: only the systemd listener was tried")
