"""A private Dovecot LMTP server (Debian's ``dovecot-lmtpd``) on a free loopback port.

Its whole config is generated: LMTP only, no TLS, users from a passwd-file (one line per
``user@domain``, all delivered as ``nobody`` into Maildirs under the instance's
directory), its sockets, state and log in that directory too, so it shares nothing with
a system Dovecot. Dovecot's master starts as root (it drops privileges per service), so
callers skip without the package or root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.support.process import free_port, stop, wait_for_port

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
instance_name = qpconn-test-{port}
log_path = {root}/dovecot.log
protocols = lmtp
listen = 127.0.0.1
ssl = no
mail_location = maildir:~/Maildir
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


def dovecot_usable() -> str | None:
    """Why a private Dovecot LMTP cannot run here, or None when it can."""
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    if not os.path.exists(binary):
        return "dovecot is not installed (apt-get install dovecot-core dovecot-lmtpd)"
    if not os.path.exists("/usr/lib/dovecot/lmtp"):
        return "Dovecot's LMTP server is not installed (apt-get install dovecot-lmtpd)"
    if os.geteuid() != 0:
        return "Dovecot's master must be started as root"
    for user in ("dovecot", "dovenull", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no {user} user"
    return None


@dataclass(frozen=True)
class PrivateDovecot:
    """A running instance: its LMTP port, its log, and where a user's mail lands."""

    port: int
    root: str

    @property
    def log(self) -> str:
        return os.path.join(self.root, "dovecot.log")

    def delivered(self, user: str) -> list[bytes]:
        """Every message in ``user``'s Maildir (new/ and cur/)."""
        messages = []
        for sub in ("new", "cur"):
            folder = os.path.join(self.root, "mail", user, "Maildir", sub)
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                with open(os.path.join(folder, name), "rb") as handle:
                    messages.append(handle.read())
        return messages


@contextmanager
def private_dovecot(users: Sequence[str]) -> Iterator[PrivateDovecot]:
    """Start Dovecot with LMTP for ``users`` (``local@domain``); stop it afterwards.

    Skips the test when Dovecot cannot run here or does not start.
    """
    reason = dovecot_usable()
    if reason:
        pytest.skip(reason)
    nobody = pwd.getpwnam("nobody")
    # Dovecot's processes run as dovecot and nobody: the tree must be reachable by them,
    # which pytest's private tmp_path is not.
    root = tempfile.mkdtemp(prefix="qpconn-dovecot-")
    os.chmod(root, 0o755)
    port = free_port()
    try:
        for name in ("run", "state", "mail"):
            os.makedirs(os.path.join(root, name))
        os.chown(os.path.join(root, "mail"), nobody.pw_uid, nobody.pw_gid)
        with open(os.path.join(root, "users"), "w") as handle:
            for user in users:
                home = os.path.join(root, "mail", user.split("@")[0])
                handle.write(f"{user}:{{PLAIN}}unused:{nobody.pw_uid}:{nobody.pw_gid}::{home}::\n")
        os.chmod(os.path.join(root, "users"), 0o644)
        config = os.path.join(root, "dovecot.conf")
        with open(config, "w") as handle:
            handle.write(CONFIG.format(root=root, port=port))
        with open(os.path.join(root, "stdout.log"), "wb") as out:
            process = subprocess.Popen(
                [shutil.which("dovecot") or "/usr/sbin/dovecot", "-F", "-c", config],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            try:
                wait_for_port(port, process)
            except (RuntimeError, TimeoutError) as exc:
                with open(os.path.join(root, "stdout.log"), errors="replace") as log:
                    pytest.skip(f"dovecot did not start ({exc}): {log.read()[-1000:]}")
            yield PrivateDovecot(port=port, root=root)
        finally:
            stop(process)
    finally:
        shutil.rmtree(root, ignore_errors=True)
