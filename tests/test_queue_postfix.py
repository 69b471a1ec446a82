"""queue/smtp-forward through a real Postfix (Debian's package) on loopback.

A private Postfix instance (its own config directory, queue and log under a temporary
directory, listening on a free 127.0.0.1 port) relays to an aiosmtpd final hop. Our
client's 250 must carry Postfix's own queue id, and the message must come out of
Postfix intact. Postfix's master must start as root (it drops to the ``postfix`` user);
without the package, root or that user, the test skips.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from tests.e2e_client import Client
from tests.support.nexthop import Recorder, aiosmtpd_next_hop, wait_until
from tests.support.process import free_port, wait_for_port
from tests.support.server import in_thread

MASTER_CF = """\
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
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
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
relayhost = [127.0.0.1]:{hop}
relay_domains = mx.test example.org
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = check_recipient_access texthash:{root}/etc/access
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
alias_maps =
alias_database =
local_recipient_maps =
smtputf8_enable = no
biff = no
"""


def _postfix_usable() -> str | None:
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
    # Postfix only reports on stderr when it is a terminal; its maillog has the rest.
    return subprocess.run(
        ["postfix", "-c", config, *command], capture_output=True, timeout=30, check=False
    )


@pytest.fixture
def postfix_relay() -> Iterator[tuple[int, Recorder, str]]:
    """(Postfix's port, the final hop's recorder, Postfix's log path)."""
    reason = _postfix_usable()
    if reason:
        pytest.skip(reason)
    # Postfix's processes run as the postfix user: the tree must be reachable by it,
    # which pytest's private tmp_path is not.
    root = tempfile.mkdtemp(prefix="qpconn-postfix-")
    os.chmod(root, 0o755)
    config = os.path.join(root, "etc")
    os.makedirs(config)
    os.makedirs(os.path.join(root, "spool"))
    os.makedirs(os.path.join(root, "data"))
    shutil.chown(os.path.join(root, "data"), "postfix")
    port = free_port()
    with aiosmtpd_next_hop() as (hop, controller):
        with open(os.path.join(config, "main.cf"), "w") as handle:
            handle.write(MAIN_CF.format(root=root, hop=controller.port))
        with open(os.path.join(config, "master.cf"), "w") as handle:
            handle.write(MASTER_CF.format(port=port))
        with open(os.path.join(config, "access"), "w") as handle:
            handle.write("gone@mx.test REJECT 5.1.1 No such user here\n")
        started = postfix(config, "start")
        try:
            if started.returncode != 0:
                pytest.skip(f"postfix did not start: {started.stderr.decode(errors='replace')}")
            wait_for_port(port, _Alive())
            yield port, hop, os.path.join(root, "maillog")
        finally:
            postfix(config, "stop")
            shutil.rmtree(root, ignore_errors=True)


class _Alive:
    """wait_for_port wants a process; Postfix daemonised itself, so this one never ends."""

    returncode = None

    def poll(self) -> None:
        return None


def _read(path: str) -> str:
    with open(path, errors="replace") as handle:
        return handle.read()


def send(address: tuple[str, int], rcpts: list[str]) -> tuple[int, str]:
    with Client(address, timeout=30) as client:
        assert client.cmd("EHLO client.test").code == 250
        text = b"Subject: through postfix\r\nMessage-ID: <pf1@client.test>\r\n\r\nhello\r\n..x"
        reply = client.transaction("<a@example.org>", rcpts, text)
        client.cmd("QUIT")
    return reply.code, reply.text


@pytest_twisted.ensureDeferred
async def test_forward_through_postfix(qpconn_server, postfix_relay: Any):
    port, hop, maillog = postfix_relay
    server = qpconn_server(
        plugins=["relay", "rcpt_ok", f"queue/smtp-forward 127.0.0.1 {port} timeout=20"]
    )
    code, text = await in_thread(send, server.address, ["<user@mx.test>"])
    assert code == 250, text
    # Postfix's own words: "2.0.0 Ok: queued as 4ABCDEF..." quoted in our reply.
    assert "said: 2.0.0 Ok: queued as " in text, text
    postfix_id = text.rsplit("queued as ", 1)[1].rstrip(")")
    assert await in_thread(wait_until, lambda: len(hop.messages) == 1, 20), _read(maillog)
    (message,) = hop.messages
    assert message.recipients == ["user@mx.test"]
    assert f"with ESMTP id {postfix_id}".encode() in message.content  # Postfix's Received
    assert b"by mx.test (qpconn" in message.content  # and ours
    assert message.content.endswith(b"\r\n\r\nhello\r\n.x\r\n")


@pytest_twisted.ensureDeferred
async def test_postfix_refusing_one_recipient(qpconn_server, postfix_relay: Any):
    port, hop, maillog = postfix_relay
    server = qpconn_server(
        plugins=["relay", "rcpt_ok", f"queue/smtp-forward 127.0.0.1 {port} timeout=20"]
    )
    code, text = await in_thread(send, server.address, ["<user@mx.test>", "<gone@mx.test>"])
    assert code == 250, text
    # Postfix relays the message to user@ and our bounce (from <>) to the sender.
    assert await in_thread(wait_until, lambda: len(hop.messages) == 2, 20), _read(maillog)
    by_sender = {m.sender: m for m in hop.messages}
    assert by_sender["a@example.org"].recipients == ["user@mx.test"]
    bounce = by_sender["<>"]
    assert bounce.recipients == ["a@example.org"]
    assert b"Final-Recipient: rfc822; gone@mx.test" in bounce.content
    assert b"No such user here" in bounce.content
