"""``twistd -n qpconn`` started as a separate process, as an administrator would."""

from __future__ import annotations

import os
import smtplib

from tests.support.process import free_port, running, twistd_command


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
    assert message.endswith(b"\r\n\r\nbody\r\n")
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
