"""docs/examples/cluster/run, smaller: 200 messages from 5 clients through HAProxy to three
qpconn nodes in network namespaces, one node SIGKILLed and restarted mid-run.

The script builds the hosts itself (198.18.0.0/24 on a bridge inside a namespace; nothing
in the root namespace), so this test needs root, ``ip netns``, haproxy, redis-server and
postfix; the script says why it cannot run (exit status 77) and the test skips with that.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "examples" / "cluster" / "run"
SUMMARY = re.compile(
    r"^sent=(\d+) acked=(\d+) delivered=(\d+) lost=(\d+) limited=(\d+) "
    r"greylisted_across=(\d+)$",
    re.M,
)


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for program in ("ip", "haproxy", "redis-server", "postfix"):
        if shutil.which(program) is None and not os.path.exists(f"/usr/sbin/{program}"):
            return f"{program} is not installed"
    return None


def test_the_cluster_loses_no_acknowledged_message_when_a_node_is_killed():
    reason = missing()
    if reason:
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--messages", "200", "--clients", "5"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if done.returncode == 77:
        pytest.skip(done.stderr.strip())
    output = done.stdout
    assert done.returncode == 0, output + done.stderr
    sent, acked, delivered, lost, limited, across = map(int, SUMMARY.search(output).groups())
    assert (sent, lost) == (200, 0)
    assert acked == delivered == 200  # every message was retried until a node took it
    assert limited == 0  # the built-in per-address limits (per node) are not reached
    assert across == 3  # each triplet deferred on one node passed on another (Redis)
    assert re.search(r"^received: 200 of 200 delivered messages .*; 0 do not$", output, re.M)
    down_up = re.search(r"^haproxy: node2 SIGKILLed; DOWN after [\d.]+s; restarted, UP", output,
                        re.M)  # fmt: skip
    assert down_up, output
    greylisted = re.findall(r"deferred \(450\) on (node\d)\S*, then 250 on (node\d)", output)
    assert len(greylisted) == 3 and all(first != second for first, second in greylisted)
    # torn down: none of its namespaces is left
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    assert "qpconn-cluster-" not in listed.stdout
