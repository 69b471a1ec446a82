"""A real Dovecot reading a Maildir, for the tests of what ``queue/maildir`` stores.

``doveadm fetch -u USER`` looks the user up through Dovecot's auth service, so
:func:`dovecot_reader` starts a Dovecot master with no protocols (the auth service only)
on a private ``base_dir``, with a static userdb whose mail location is the Maildir under
test, and stops it afterwards. Dovecot refuses to open mail as root, so as root the
Maildir is handed to ``nobody`` (it is a test's own copy).

Dovecot trusts a Maildir file name's ``,S=<size>``: a size that is not the file's makes
``doveadm fetch`` fail with "Cached message size larger than expected", so a clean fetch
checks the size too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

NOBODY = 65534


def missing() -> str | None:
    """Why the Dovecot tests cannot run here, or None."""
    for program in ("dovecot", "doveadm"):
        if shutil.which(program) is None:
            return f"{program} not installed (Debian package dovecot-core)"
    return None


@dataclass
class Fetched:
    """What ``doveadm fetch`` printed, and what it complained about."""

    stdout: str
    stderr: str


@dataclass
class DovecotReader:
    config: str

    def fetch(self, fields: str, *search: str) -> Fetched:
        """``doveadm fetch -u reader FIELDS SEARCH...`` (default ``all``) on the Maildir."""
        done = subprocess.run(
            ["doveadm", "-c", self.config, "fetch", "-u", "reader", fields, *(search or ["all"])],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return Fetched(done.stdout, done.stderr)


def _own(path: str, uid: int, gid: int) -> None:
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid)


@contextmanager
def dovecot_reader(maildir: str) -> Iterator[DovecotReader]:
    """A Dovecot whose user ``reader`` has ``maildir`` as INBOX, for ``doveadm``."""
    # Short: the auth sockets live under it, and a socket path has ~100 bytes at most.
    base = tempfile.mkdtemp(prefix="qpdv-")
    uid, gid = (NOBODY, NOBODY) if os.getuid() == 0 else (os.getuid(), os.getgid())
    index = os.path.join(base, "index")
    os.mkdir(index)
    os.chmod(base, 0o755)
    if os.getuid() == 0:
        _own(maildir, uid, gid)
        _own(index, uid, gid)
        for parent in _parents(maildir):
            os.chmod(parent, os.stat(parent).st_mode | 0o055)  # nobody may reach it
    config = os.path.join(base, "dovecot.conf")
    with open(config, "w", encoding="utf-8") as handle:
        handle.write(
            f"base_dir = {base}/run\n"
            "log_path = /dev/stderr\n"
            "protocols =\n"
            "ssl = no\n"
            f"mail_location = maildir:{maildir}:INDEX={index}:CONTROL={index}\n"
            f"userdb {{\n  driver = static\n  args = uid={uid} gid={gid} home={index}\n}}\n"
            "passdb {\n  driver = static\n  args = nopassword=y\n}\n"
        )
    log = open(os.path.join(base, "dovecot.log"), "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        ["dovecot", "-F", "-c", config], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        socket_path = os.path.join(base, "run", "auth-userdb")
        deadline = time.monotonic() + 30
        while not os.path.exists(socket_path):
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                with open(os.path.join(base, "dovecot.log"), encoding="utf-8") as text:
                    raise RuntimeError(f"dovecot did not start: {text.read()}")
            time.sleep(0.05)
        yield DovecotReader(config)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def _parents(path: str) -> list[str]:
    """The directories above ``path`` up to (not including) /tmp's parent."""
    found = []
    current = os.path.dirname(os.path.abspath(path))
    while current not in ("/", "") and current != os.path.dirname(tempfile.gettempdir()):
        found.append(current)
        current = os.path.dirname(current)
    return found
