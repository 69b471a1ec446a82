"""``twistd -n qpconn`` as docs/running.md and docs/config.md describe it."""

from __future__ import annotations

import smtplib
import socket
import subprocess

import pytest

from qpconn.config import default_hostname
from tests.test_docs_tac import delivered, free_port, running_twistd, send, twistd, wait_for_log


def test_defaults_accept_localhost_and_this_host_into_dot_maildir(tmp_path):
    port = free_port()
    with running_twistd(["qpconn", "--listen", f"tcp:{port}:interface=127.0.0.1"], port, tmp_path):
        ehlo = send(port, "someone@localhost")
        assert ehlo[1].startswith(default_hostname().encode() + b" Hi ")
        assert b"\nSIZE 52428800\n" in ehlo[1]
        send(port, f"postmaster@{default_hostname()}")
        with (
            smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp,
            pytest.raises(smtplib.SMTPRecipientsRefused) as refused,
        ):
            smtp.sendmail("a@example.org", ["user@elsewhere.example"], b"\r\nhi\r\n")
        assert refused.value.recipients == {
            "user@elsewhere.example": (550, b"5.7.1 Relaying denied")
        }
        assert len(delivered(tmp_path / "maildir")) == 2


def test_config_directory_hostname_and_two_endpoints(tmp_path):
    port = free_port()
    sock_path = tmp_path / "qpconn.sock"
    config = tmp_path / "config"
    config.mkdir()
    (config / "rcpthosts").write_text("example.com   # the main domain\n.example.com\n")
    (config / "smtpgreeting").write_text("Welcome to example.com\n")
    (config / "databytes").write_text("1000\n")
    (config / "plugins").write_text(
        "relay\ncount_unrecognized_commands 2\nrcpt_ok\nqueue/maildir ./store\n"
    )
    args = [
        "qpconn",
        "--config", str(config),
        "--hostname", "mx.example.com",
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--listen", f"unix:{sock_path}",
    ]  # fmt: skip
    with running_twistd(args, port, tmp_path) as log:
        send(port, "a@example.com")
        send(port, "b@lists.example.com")
        with smtplib.SMTP(timeout=10) as smtp:
            greeting = smtp.connect("127.0.0.1", port)
            assert greeting == (220, b"Welcome to example.com ESMTP")
            smtp.ehlo("client.test")
            assert smtp.esmtp_features["size"] == "1000"
            assert smtp.docmd("XFOO") == (500, b"5.5.1 Unrecognized command")
            code, text = smtp.docmd("XBAR")
        assert (code, text) == (521, b"5.5.1 Closing connection: 2 unrecognized commands")

        with socket.socket(socket.AF_UNIX) as unix:
            unix.settimeout(10)
            unix.connect(str(sock_path))
            unix.sendall(b"HELO client.test\r\nQUIT\r\n")
            data = b""
            while chunk := unix.recv(4096):
                data += chunk
        assert data.startswith(b"220 Welcome to example.com ESMTP\r\n")
        assert b"250 mx.example.com Hi unknown [unix]\r\n" in data
        assert len(delivered(tmp_path / "store")) == 2
        content = wait_for_log(log, "accepted from=<sender@example.org> to=<b@lists")
        print(content)
    assert content.count(" connect from ") >= 3
    assert "accepted from=<sender@example.org> to=<a@example.com> size=" in content


def test_missing_config_directory_stops_twistd_with_a_message(tmp_path):
    command = [*twistd(), "-n", "--pidfile=", "qpconn", "--config", str(tmp_path / "nope")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"does not exist" in result.stdout + result.stderr
