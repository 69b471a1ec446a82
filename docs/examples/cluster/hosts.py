"""The cluster's hosts: their configuration files and the processes that serve them.

* ``lb`` (198.18.0.10): HAProxy, TCP mode, round robin over the nodes, PROXY v2 to each
  (``send-proxy-v2``) and an SMTP health check that sends one too (``check-send-proxy``);
  its stats socket tells when a node is taken out and put back.
* ``node1``..``node3`` (198.18.0.11-13): ``twistd qpconn --proxy-protocol --proxy-from
  198.18.0.10/32``, the ``limit`` plugin and greylisting in Redis, forwarding to the
  delivery host.
* ``state`` (198.18.0.20): Redis, the greylisting triplets and the ``limit`` counters every
  node shares.
* ``mx`` (198.18.0.30): Postfix, delivering into one Maildir (virtual(8)).

Why Postfix as the delivery host: it is the most common next hop of a qpconn, starts in a
second, and its Maildir can be read back to check that every acknowledged message arrived.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from netns import Network

LB = "198.18.0.10"
STATE = "198.18.0.20"
MX = "198.18.0.30"
#: the load's clients (relay clients: not greylisted) and the greylisting demo's client
CLIENT_NETWORK = "198.18.0.96/27"
GREY_CLIENT = "198.18.0.200"
#: the client that sends more recipients than its allowance (not a relay client either)
LIMIT_CLIENT = "198.18.0.210"
#: the ``limit`` plugin's per-address allowance: recipients per window, for every node
#: together. A long window, so that a burst on a busy machine cannot outlast it (a
#: window that ended mid-burst would let more than RCPT_LIMIT through).
RCPT_LIMIT = 10
RCPT_WINDOW = "10m"
DOMAIN = "cluster.test"
#: seconds a greylisted triplet must wait before its retry passes
BLACK_TIMEOUT = 1


def node_address(index: int) -> str:
    return f"198.18.0.{10 + index}"


def client_addresses(count: int) -> list[str]:
    return [f"198.18.0.{100 + i}" for i in range(count)]


def twistd() -> list[str]:
    """twistd of the interpreter running this script (the virtualenv qpconn is in)."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    return path


class Processes:
    """Every long-running process started here, stopped (by its own pid) at the end."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, host: str, command: Sequence[str], cwd: str | None = None,
              env: dict[str, str] | None = None) -> None:
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")  # noqa: SIM115
        with log:
            self.running[name] = subprocess.Popen(
                Network.run_in(host, command), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=cwd or self.workdir,
                env=None if env is None else {**os.environ, **env},
            )  # fmt: skip

    def kill(self, name: str) -> None:
        """SIGKILL one process (``ip netns exec`` execs it: the pid is the server's)."""
        process = self.running.pop(name)
        process.kill()
        process.wait(timeout=10)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each running process has used so far."""
        return {name: process_cpu(process.pid) for name, process in self.running.items()}

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 10
        for process in self.running.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.running.clear()


def process_cpu(pid: int) -> float:
    """User + system seconds of ``pid`` (0 when it is gone), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(host_ip: str, port: int, process: subprocess.Popen[bytes] | None,
                   namespace_probe: Sequence[str], timeout: float = 30.0) -> None:
    """Until ``host_ip:port`` accepts, probed from inside the cluster (bounded)."""
    deadline = time.monotonic() + timeout
    probe = [*namespace_probe, sys.executable, "-c",
             f"import socket; socket.create_connection(({host_ip!r}, {port}), 1).close()"]
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server for {host_ip}:{port} exited ({process.returncode})")
        done = subprocess.run(probe, capture_output=True, timeout=10, check=False)
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {host_ip}:{port} after {timeout}s")


# -- Redis --------------------------------------------------------------------------------
def start_redis(procs: Processes) -> None:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    procs.start("redis", "state", [
        binary, "--bind", STATE, "--port", "6379", "--protected-mode", "no", "--save", "",
        "--appendonly", "no", "--dir", procs.workdir, "--daemonize", "no",
    ])  # fmt: skip


# -- Postfix ------------------------------------------------------------------------------
POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = {mx}
inet_protocols = ipv4
myhostname = mx.{domain}
mydestination =
mynetworks = 198.18.0.0/24
relay_domains =
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
alias_maps =
alias_database =
local_recipient_maps =
smtputf8_enable = no
biff = no
"""

POSTFIX_MASTER = """\
{mx}:25 inet n - n - - smtpd
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
virtual   unix  - n n - - virtual
"""


class Postfix:
    """Postfix on the delivery host; its master daemonises, so it is stopped by command."""

    def __init__(self, workdir: str) -> None:
        self.root = os.path.join(workdir, "postfix")
        self.config = os.path.join(self.root, "etc")
        self.maildir = os.path.join(self.root, "mail", "inbox")

    def start(self) -> None:
        values = {"root": self.root, "mx": MX, "domain": DOMAIN}
        for name in ("etc", "spool", "data", "mail"):
            os.makedirs(os.path.join(self.root, name), exist_ok=True)
        os.chmod(self.root, 0o755)
        shutil.chown(os.path.join(self.root, "data"), "postfix")
        shutil.chown(os.path.join(self.root, "mail"), 65534, 65534)
        write(os.path.join(self.config, "main.cf"), POSTFIX_MAIN.format(**values))
        write(os.path.join(self.config, "master.cf"), POSTFIX_MASTER.format(**values))
        done = self.command("start")
        if done.returncode != 0:
            raise RuntimeError(f"postfix did not start: {done.stderr.strip()} (see {self.root})")

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(Network.run_in("mx", ["postfix", "-c", self.config, *args]),
                              capture_output=True, text=True, timeout=60, check=False)

    def queue_empty(self) -> bool:
        """No message waiting in Postfix's queue (incoming, active or deferred)."""
        for sub in ("incoming", "active", "deferred", "maildrop"):
            path = os.path.join(self.root, "spool", sub)
            for _dirpath, _dirs, files in os.walk(path):
                if files:
                    return False
        return True

    def messages(self) -> list[bytes]:
        found = []
        for sub in ("new", "cur"):
            path = os.path.join(self.maildir, sub)
            if os.path.isdir(path):
                for name in os.listdir(path):
                    with open(os.path.join(path, name), "rb") as handle:
                        found.append(handle.read())
        return found


# -- qpconn -------------------------------------------------------------------------------
def node_config(workdir: str, index: int, shared_limits: bool = True) -> str:
    """The config directory of node ``index``; ``limit`` counts in Redis unless
    ``shared_limits`` is false (each node counting alone, for showing the difference)."""
    store = f"redis redis://{STATE}:6379/0 " if shared_limits else ""
    config = os.path.join(workdir, f"node{index}", "config")
    files = {
        "me": f"node{index}.{DOMAIN}\n",
        "rcpthosts": f"{DOMAIN}\n",
        "relayclients": f"{CLIENT_NETWORK}\n",
        # the per-address limits apply to every client; HAProxy's own health checks are
        # exempt (one every 300 ms would exceed the 60-a-minute rate)
        "connection_limit_exceptions": f"{LB}\n",
        # relay clients (the load) are exempt from rate_rcpt_host; limit comes after
        # greylisting, so that a greylisted recipient is not counted against the allowance.
        # No connect limit (rate_conn, concurrency): HAProxy's health checks (PROXY LOCAL)
        # arrive from its own address, which those would count and, soon, refuse.
        "plugins": "\n".join([
            "relay",
            f"greylisting redis redis://{STATE}:6379/0 black_timeout {BLACK_TIMEOUT}",
            f"limit {store}rate_rcpt_host {RCPT_LIMIT}/{RCPT_WINDOW}",
            "rcpt_ok",
            f"queue/smtp_forward {MX} 25 pool=4",
        ]) + "\n",
    }  # fmt: skip
    for name, text in files.items():
        write(os.path.join(config, name), text)
    return config


def start_node(procs: Processes, index: int, shared_limits: bool = True) -> None:
    config = node_config(procs.workdir, index, shared_limits)
    command = [*twistd(), "--nodaemon", "--pidfile=", "qpconn",
               "--listen", f"tcp:25:interface={node_address(index)}", "--config", config,
               "--proxy-protocol", "--proxy-from", f"{LB}/32", "--no-rdns"]  # fmt: skip
    # unbuffered: the log is read while the node runs (run counts its limit refusals), and
    # a node killed with SIGKILL keeps every line it wrote
    procs.start(f"node{index}", f"node{index}", command, cwd=os.path.dirname(config),
                env={"PYTHONUNBUFFERED": "1"})  # fmt: skip


# -- HAProxy ------------------------------------------------------------------------------
def haproxy_config(workdir: str, nodes: int) -> str:
    servers = [f"    server node{i} {node_address(i)}:25 check" for i in range(1, nodes + 1)]
    return write(os.path.join(workdir, "haproxy.cfg"), "\n".join([
        "global",
        "    maxconn 4000",
        f"    stats socket {stats_socket(workdir)} mode 600 level admin",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    retries 3",
        "    option redispatch",
        "frontend smtp",
        f"    bind {LB}:25",
        "    default_backend qpconn",
        "backend qpconn",
        "    balance roundrobin",
        "    option smtpchk HELO lb.cluster.test",
        "    default-server inter 300ms fall 2 rise 2 send-proxy-v2 check-send-proxy",
        *servers,
        "",
    ]))  # fmt: skip


def stats_socket(workdir: str) -> str:
    return os.path.join(workdir, "haproxy.sock")


def start_haproxy(procs: Processes, nodes: int) -> None:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    config = haproxy_config(procs.workdir, nodes)
    procs.start("haproxy", "lb", [binary, "-f", config, "-db"])


def server_states(workdir: str) -> dict[str, str]:
    """HAProxy's view of each node (``UP``, ``DOWN``, ``UP 1/2`` ...), from its stats socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(stats_socket(workdir))
            sock.sendall(b"show stat\n")
            data = b""
            for _ in range(1000):  # bounded: HAProxy closes after the answer
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return {}
    lines = data.decode(errors="replace").splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    columns = lines[0][2:].split(",")
    states = {}
    for line in lines[1:]:
        row = dict(zip(columns, line.split(","), strict=False))
        if row.get("pxname") == "qpconn" and row.get("svname", "").startswith("node"):
            states[row["svname"]] = row.get("status", "")
    return states
