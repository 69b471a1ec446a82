"""A private Postfix instance (Debian's package) on a free loopback port, for tests.

Its config directory, queue and log live under a temporary directory; tests add the lines
that make it a relay or an LMTP client. Postfix's master must start as root (it drops to
the ``postfix`` user), so callers skip without the package, root or that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.support.process import free_port, wait_for_port

#: services every test instance needs; tests add the delivery agents they use
BASE_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

#: a loopback-only instance that relays for mx.test and example.org from 127.0.0.0/8
BASE_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.test
mydestination =
mynetworks = 127.0.0.0/8
relay_domains = mx.test example.org
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
alias_maps =
alias_database =
local_recipient_maps =
smtputf8_enable = no
biff = no
"""


def postfix_usable() -> str | None:
    """Why a private Postfix cannot run here, or None when it can."""
    if shutil.which("postfix") is None:
        return "postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "Postfix's master must be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no postfix user"
    return None


def postfix(config: str, *command: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``postfix -c config command...``, bounded in time."""
    # Postfix only reports on stderr when it is a terminal; its maillog has the rest.
    return subprocess.run(
        ["postfix", "-c", config, *command], capture_output=True, timeout=30, check=False
    )


class _Alive:
    """wait_for_port wants a process; Postfix daemonised itself, so this one never ends."""

    returncode = None

    def poll(self) -> None:
        return None


def read(path: str) -> str:
    """A log file's text, for assertion messages."""
    with open(path, errors="replace") as handle:
        return handle.read()


@dataclass(frozen=True)
class PrivatePostfix:
    """A running instance: where it listens for SMTP and where it logs."""

    port: int
    maillog: str


@contextmanager
def private_postfix(
    main_cf: str, master_cf: str, files: Mapping[str, str] | None = None, **values: object
) -> Iterator[PrivatePostfix]:
    """Start Postfix with the base config plus ``main_cf``/``master_cf`` lines; stop it after.

    The lines are templates: ``{root}`` is the instance's directory, ``{port}`` its SMTP
    port, and any other name comes from ``values``. ``files`` are written into its config
    directory. Skips the test when Postfix cannot run here or does not start.
    """
    reason = postfix_usable()
    if reason:
        pytest.skip(reason)
    # Postfix's processes run as the postfix user: the tree must be reachable by it,
    # which pytest's private tmp_path is not.
    root = tempfile.mkdtemp(prefix="qpconn-postfix-")
    os.chmod(root, 0o755)
    config = os.path.join(root, "etc")
    for name in ("etc", "spool", "data"):
        os.makedirs(os.path.join(root, name))
    shutil.chown(os.path.join(root, "data"), "postfix")
    port = free_port()
    try:
        for name, text in (
            ("main.cf", BASE_MAIN_CF + main_cf),
            ("master.cf", BASE_MASTER_CF + master_cf),
            *(files or {}).items(),
        ):
            with open(os.path.join(config, name), "w") as handle:
                handle.write(text.format(root=root, port=port, **values))
        started = postfix(config, "start")
        try:
            if started.returncode != 0:
                pytest.skip(f"postfix did not start: {started.stderr.decode(errors='replace')}")
            wait_for_port(port, _Alive())  # type: ignore[arg-type]
            yield PrivatePostfix(port=port, maillog=os.path.join(root, "maillog"))
        finally:
            stop_postfix(config, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def stop_postfix(config: str, root: str) -> None:
    """``postfix stop``; a master that does not stop within its bound is SIGKILLed (its
    pid from the instance's own queue directory), so that a slow stop neither fails the
    test that used it nor leaves an instance behind."""
    try:
        postfix(config, "stop")
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        with open(os.path.join(root, "spool", "pid", "master.pid")) as handle:
            pid = int(handle.read().split()[0])
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass  # no pid file, or the master is gone already
