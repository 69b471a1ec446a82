"""A finished session leaves no reference cycle behind.

Each session's objects (protocol, Connection, Transaction, the core session, and the
Twisted transport with its buffers) must go as soon as the session is over, by reference
counting. Kept alive by a cycle they wait for the garbage collector, whose passes then
grow with every connection made: about 10 µs per connection, 3% of the CPU of a server
taking a new connection per message. The check runs in a child process
(tests/support/freed_probe.py) whose logging is begun as twistd begins it: in the test
process Twisted keeps every log event until logging begins, and those events name the
protocol.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def test_finished_sessions_are_freed_without_the_collector(tmp_path: Any) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.freed_probe", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    sessions = {line["session"]: line["alive"] for line in lines if "session" in line}
    assert sessions == {"mail_and_quit": False, "vanish_mid_data": False, "refused_helo": False}
    assert lines[-1] == {"stored": 1}  # the message of the client that vanished is not stored
    log = (tmp_path / "qpconn.log").read_text()
    assert log.count(" disconnect") == 3  # logging after the logger was released still works
