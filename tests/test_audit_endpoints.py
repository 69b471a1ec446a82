"""Issue 2, "Running it": ``--listen`` takes any Twisted server endpoint, repeatedly.

``tcp:`` and ``unix:`` are exercised by tests/test_docs_running.py and ``ssl:`` by
tests/test_e2e_tls.py; here ``twistd -n qpconn`` runs as a separate process with a
``tcp6:`` listener on ``::1`` and a ``systemd:`` listener on a socket it inherits the way
systemd hands one over (``LISTEN_FDS``, ``LISTEN_FDNAMES``, ``LISTEN_PID``, descriptor
3), and one message goes through each. Without ``--listen``, the default is the documented
one.
"""

from __future__ import annotations

import os
import smtplib
import socket
from pathlib import Path

import pytest

from qpconn.app.options import Options
from qpconn.app.service import DEFAULT_LISTEN
from tests.support.process import free_port, logged_process, twistd_command, wait_for_port


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
        for line in (new / name).read_bytes().split(b"\r\n")
        if line.startswith(b"Subject: ")
    )
    expected = [b"Subject: via systemd"] + ([b"Subject: via tcp6"] if v6_port else [])
    assert subjects == expected, (tmp_path / "server.log").read_text()
    if v6_port is None:
        pytest.skip("no IPv6 loopback here: only the systemd listener was tried")
