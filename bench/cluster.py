"""Messages per second through HAProxy with 1, 2 and 3 qpconn nodes, on this machine.

    sudo .venv/bin/python bench/cluster.py [--messages 2000] [--clients 20] [--repeat 3]

Each run is ``docs/examples/cluster/run --nodes N --no-kill --triplets 0 --abuse 0``: the
same hosts in network namespaces (HAProxy with PROXY v2, the nodes with Redis greylisting,
the Redis ``limit`` plugin (relay clients, as the load's are, skip its Redis calls) and
forwarding to Postfix, which delivers into a Maildir), no node killed, no greylisting or
limit demonstration. The figure is the load's own: acknowledged messages over the seconds from
its first connection to its last reply. Every process of the cluster (and the Python
clients) shares this machine's cores, so the figures say how the layout scales here, not
what separate machines would do. The median of ``--repeat`` runs is printed.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs",
                      "examples", "cluster", "run")  # fmt: skip
RATE = re.compile(r"rate=([\d.]+) msg/s")
CPU = re.compile(r"^cpu seconds: (.*)$", re.M)


def one_run(nodes: int, messages: int, clients: int) -> tuple[float, str]:
    command = [sys.executable, SCRIPT, "--nodes", str(nodes), "--no-kill", "--triplets", "0",
               "--abuse", "0", "--messages", str(messages), "--clients", str(clients)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise SystemExit(f"cluster run failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    match = RATE.search(done.stdout)
    if match is None:
        raise SystemExit(f"no rate in the cluster's output:\n{done.stdout}")
    cpu = CPU.search(done.stdout)
    return float(match.group(1)), cpu.group(1) if cpu else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count()
    print(f"{args.messages} messages, {args.clients} clients, {cores} cores, "
          f"median of {args.repeat} runs")  # fmt: skip
    print("| nodes | msg/s (median) | runs | CPU seconds of the last run |")
    print("|---|---|---|---|")
    for nodes in (1, 2, 3):
        results = [one_run(nodes, args.messages, args.clients) for _ in range(args.repeat)]
        rates = [rate for rate, _ in results]
        runs = ", ".join(f"{rate:.0f}" for rate in rates)
        median = statistics.median(rates)
        print(f"| {nodes} | {median:.0f} | {runs} | {results[-1][1]} |", flush=True)


if __name__ == "__main__":
    main()
