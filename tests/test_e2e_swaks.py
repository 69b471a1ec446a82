"""End-to-end with swaks: any SMTP client can send mail (issue 2). swaks (Debian's package), a
client written by someone else in another language, delivers to the real server: plainly,
pipelined, and with a dot-stuffed body, and each message lands in the Maildir intact.

Skipped when swaks is not installed (``apt-get install swaks``; ``.ci/run`` does).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import pytest_twisted

from tests.e2e_client import split_message
from tests.support.server import in_thread

SWAKS = shutil.which("swaks")


def swaks(address: tuple[str, int], *extra: str) -> subprocess.CompletedProcess[str]:
    host, port = address
    return subprocess.run(
        [SWAKS, "--server", host, "--port", str(port), "--helo", "client.test",
         "--from", "sender@example.org", "--to", "user@mx.test", "--timeout", "10", *extra],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (apt-get install swaks)")
@pytest.mark.parametrize("mode", [[], ["--pipeline"]], ids=["plain", "pipelined"])
@pytest_twisted.ensureDeferred
async def test_swaks_delivers_into_the_maildir(server, mode):
    body = "first line\n.leading dot\n..two dots\nlast line"
    done = await in_thread(
        swaks, server.address, *mode, "--header", "Subject: from swaks", "--body", body
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "<-  250 2.0.0 Queued as " in done.stdout
    (message,) = server.messages()
    fields, stored = split_message(message)
    assert b"Subject: from swaks" in fields
    assert any(f.startswith(b"Received: from client.test (unknown [127.0.0.1])") for f in fields)
    # swaks dot-stuffs and the server unstuffs: the body comes out as it went in.
    assert stored.startswith(b"first line\n.leading dot\n..two dots\nlast line\n")
