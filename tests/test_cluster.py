"""docs/examples/cluster/run, smaller: 200 messages from 5 clients through HAProxy to three
qpconn nodes in network namespaces, one node SIGKILLed and restarted mid-run, and a client
over its per-address limit refused by every node, because the ``limit`` plugin counts in
Redis; the same run with each node counting alone lets it through and exits 2.

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
    r"greylisted_across=(\d+|n/a)$",
    re.M,
)


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for program in ("ip", "haproxy", "redis-server", "postfix"):
        if shutil.which(program) is None and not os.path.exists(f"/usr/sbin/{program}"):
            return f"{program} is not installed"
    return None


LIMIT_LINE = re.compile(
    r"^limit: 198\.18\.0\.210 sent 25 recipients .* against rate_rcpt_host 10/10m \((.*?)\): "
    r"(\d+) accepted \((.*?)\), (\d+) refused with 450 \((.*?); the nodes logged (.*?)\); "
    r"Redis's counter for the address: (\w+)$",
    re.M,
)


def run_cluster(*options: str) -> subprocess.CompletedProcess[str]:
    reason = missing()
    if reason:
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *options],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if done.returncode == 77:
        pytest.skip(done.stderr.strip())
    return done


def by_node(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(node\d)=(\d+)", text)}


def test_the_cluster_loses_no_acknowledged_message_when_a_node_is_killed():
    done = run_cluster("--messages", "200", "--clients", "5")
    output = done.stdout
    assert done.returncode == 0, output + done.stderr
    sent, acked, delivered, lost, limited, across = map(int, SUMMARY.search(output).groups())
    assert (sent, lost) == (200, 0)
    assert acked == delivered == 200  # every message was retried until a node took it
    # the over-limit client: 10 of its 25 recipients accepted by the three nodes together,
    # the 15 others refused (450) by every node, each of which had accepted fewer than 10
    store, accepted, accepted_by, refused, refused_by, logged, in_redis = LIMIT_LINE.search(
        output
    ).groups()
    assert store == "in Redis" and (int(accepted), int(refused), in_redis) == (10, 15, "10")
    assert limited == 15
    assert len(by_node(refused_by)) >= 2 and by_node(logged) == by_node(refused_by)
    assert all(by_node(accepted_by).get(node, 0) < 10 for node in by_node(refused_by))
    # the load's clients (relay clients) were refused by no limit, cluster-wide or per node
    assert re.search(r"^limit: the load's clients .* refused 0 time\(s\) by the cluster-wide "
                     r"limit and 0 by the nodes' own", output, re.M), output  # fmt: skip
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


def test_a_limit_each_node_counts_alone_lets_the_client_through_and_the_run_says_so():
    """The check can fail: with the counters in each node's memory, round robin gives the
    client three allowances, all 25 recipients pass, and the run exits 2."""
    done = run_cluster("--messages", "20", "--clients", "2", "--triplets", "0", "--no-kill",
                       "--limit-store", "memory")  # fmt: skip
    output = done.stdout
    assert done.returncode == 2, output + done.stderr
    store, accepted, _, refused, _, _, _ = LIMIT_LINE.search(output).groups()
    assert (store, int(accepted), int(refused)) == ("in each node", 25, 0)
    assert "LIMIT NOT ENFORCED CLUSTER-WIDE" in output
    counts = tuple(map(int, SUMMARY.search(output).groups()[:5]))
    assert counts == (20, 20, 20, 0, 0), output  # sent, acked, delivered, lost, limited
