"""The cluster's network: one namespace per host on a bridge that exists only in a namespace.

Every host is a network namespace named ``qpconn-cluster-<host>``; the bridge ``br0`` lives
in its own namespace, ``qpconn-cluster-switch``, and each host is joined to it by a veth
pair (``eth0`` in the host, ``h-<host>`` on the bridge). Addresses come from 198.18.0.0/24
(RFC 2544's benchmarking range) and nothing else: no address is added to the root
namespace, no host has a route beyond its /24, so no packet can leave the cluster.

Names start with :data:`PREFIX`, so :func:`remove_stale` can tear down what a killed run
left behind (processes first, then namespaces) without touching anything else; a lock
file keeps two runs from tearing down each other.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Sequence

PREFIX = "qpconn-cluster-"
SWITCH = PREFIX + "switch"
NETWORK = ipaddress.ip_network("198.18.0.0/24")
LOCK = "/run/qpconn-cluster.lock"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (bounded in time); raise with its message when it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def namespaces() -> list[str]:
    """Our namespaces that exist now."""
    listed = ip("netns", "list", check=False).stdout.splitlines()
    names = [line.split()[0] for line in listed if line.strip()]
    return [name for name in names if name.startswith(PREFIX)]


def pids_in(namespace: str) -> list[int]:
    """Processes whose network namespace is ``namespace`` (all started by this script)."""
    listed = ip("netns", "pids", namespace, check=False).stdout.split()
    return [int(pid) for pid in listed if pid.isdigit() and int(pid) != os.getpid()]


def remove_stale(grace: float = 5.0) -> list[str]:
    """Kill what runs in our namespaces (TERM, then KILL) and delete them; idempotent."""
    found = namespaces()
    for signum in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for name in found for pid in pids_in(name)]
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [pid for name in found for pid in pids_in(name)]
            time.sleep(0.05)
    for name in found:
        ip("netns", "delete", name, check=False)
    return found


class Lock:
    """One run at a time: the stale clean-up must not tear down a live run's hosts."""

    def __init__(self) -> None:
        self.handle = open(LOCK, "w")  # noqa: SIM115 - held for the run's lifetime

    def acquire(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another cluster run holds {LOCK}") from None
                time.sleep(0.2)

    def release(self) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


class Network:
    """The switch and the hosts; :meth:`add_host` joins one with its addresses."""

    def __init__(self) -> None:
        self.hosts: dict[str, list[str]] = {}

    def create(self) -> None:
        ip("netns", "add", SWITCH)
        ip("-n", SWITCH, "link", "add", "br0", "type", "bridge")
        ip("-n", SWITCH, "link", "set", "br0", "up")

    def add_host(self, host: str, addresses: Sequence[str]) -> str:
        """A namespace for ``host`` with ``addresses`` (all in 198.18.0.0/24) on eth0."""
        for address in addresses:
            if ipaddress.ip_address(address) not in NETWORK:
                raise ValueError(f"{address} is outside {NETWORK}")
        namespace = PREFIX + host
        port = f"h-{host}"[:15]  # interface names have 15 characters at most
        ip("netns", "add", namespace)
        ip("-n", SWITCH, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", namespace)  # fmt: skip
        ip("-n", SWITCH, "link", "set", port, "master", "br0", "up")
        for address in addresses:
            ip("-n", namespace, "addr", "add", f"{address}/{NETWORK.prefixlen}", "dev", "eth0")
        ip("-n", namespace, "link", "set", "lo", "up")
        ip("-n", namespace, "link", "set", "eth0", "up")
        self.hosts[host] = list(addresses)
        return namespace

    @staticmethod
    def run_in(host: str, command: Sequence[str]) -> list[str]:
        """``command`` as run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", PREFIX + host, *command]
