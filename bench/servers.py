"""The servers under test: how each is configured, started, watched and stopped.

Every server is started fresh on 127.0.0.1 on a free port, as its own process group,
optionally pinned to one CPU with ``taskset``. Its CPU time and memory are read from
``/proc/<pid>`` (``utime+stime`` of all its threads, ``VmRSS``/``VmHWM``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tools import BENCH, Haraka, Postfix

HOSTNAME = "bench.test"  # the servers' own name and the test recipients' domain
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def twistd_command() -> list[str]:
    twistd = Path(sys.executable).parent / "twistd"
    if twistd.exists():
        return [str(twistd)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


@dataclass
class Launch:
    """What to execute for one server instance."""

    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    #: called between measured runs (e.g. to empty a Maildir); not timed
    between_runs: Callable[[], None] | None = None
    #: called first when the server is stopped, for servers whose processes leave the
    #: launched process group (Postfix's master makes a session of its own)
    stop: Callable[[], None] | None = None


@dataclass
class ServerSpec:
    """One kind of server: a name for the table and a way to launch it in a work dir."""

    name: str
    label: str
    prepare: Callable[[Path, int], Launch]
    #: pinned to the server CPU (and its load generator to the other) when pinning is on
    pinned: bool = True
    #: when not ``pinned``: the load generator is still pinned to its CPU (bench/variants.py)
    pin_load_generator: bool = False
    #: the workloads it runs (None: all)
    workloads: tuple[str, ...] | None = None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def qpconn_sink(workdir: Path, port: int) -> Launch:
    conf = workdir / "config"
    _write(conf / "plugins", "rcpt_ok\nqueue/discard\n")
    _write(conf / "rcpthosts", f"{HOSTNAME}\n")
    _write(conf / "me", f"{HOSTNAME}\n")
    argv = [
        *twistd_command(), "--nodaemon", "--pidfile=", "--logfile", str(workdir / "qpconn.log"),
        "qpconn", "--listen", f"tcp:{port}:interface=127.0.0.1", "--config", str(conf),
        "--no-rdns",
    ]  # fmt: skip
    return Launch(argv, workdir)


def from_source(
    source: Path, prepare: Callable[[Path, int], Launch]
) -> Callable[[Path, int], Launch]:
    """The configuration ``prepare`` launches, run from another copy of the code
    (``--baseline``).

    ``source`` holds a ``qpconn`` package (and ``twisted/plugins``), e.g. an unpacked
    ``git archive`` of an older commit: put first on PYTHONPATH, it is what twistd
    imports, so the two versions are measured side by side in the same run.
    """

    def prepare_from(workdir: Path, port: int) -> Launch:
        launch = prepare(workdir, port)
        path = [str(source), launch.env.get("PYTHONPATH", "")]
        launch.env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        return launch

    return prepare_from


def qpconn_supports_workers() -> bool:
    """True once ``twistd qpconn`` has a --workers option (issue 6's multi-core part)."""
    try:
        from qpconn.app.options import Options
    except ImportError:
        return False
    return any(row[0] == "workers" for row in Options.optParameters)


def qpconn_sink_workers(count: int) -> Callable[[Path, int], Launch]:
    def prepare(workdir: Path, port: int) -> Launch:
        launch = qpconn_sink(workdir, port)
        launch.argv += ["--workers", str(count)]
        return launch

    return prepare


def qpconn_maildir(workdir: Path, port: int) -> Launch:
    # No config directory: the built-in defaults (relay, count_unrecognized_commands,
    # rcpt_ok, queue/maildir ./maildir), with ./ the work dir. --hostname makes
    # bench.test one of our domains and keeps the host name out of DNS.
    argv = [
        *twistd_command(), "--nodaemon", "--pidfile=", "--logfile", str(workdir / "qpconn.log"),
        "qpconn", "--listen", f"tcp:{port}:interface=127.0.0.1", "--hostname", HOSTNAME,
        "--no-rdns",
    ]  # fmt: skip

    return Launch(argv, workdir, between_runs=lambda: empty_maildir(workdir / "maildir"))


def empty_maildir(maildir: Path) -> None:
    """Empty ``maildir`` between runs, so each run starts alike, without deleting a file.

    Its ``new/``, ``tmp/`` and ``cur/`` are moved into ``.set-aside/`` beside it and made
    again empty (same mode and owner); whatever holds the work dir removes them at the end
    of the whole benchmark (see :func:`set_aside`). Deleting them here made the next run
    pay for it: on an ext4 without a journal (this machine's) the kernel will not reuse an
    inode freed in the last 60 s (300 s while its inode table block is dirty), and each new
    file's inode allocation steps over every such inode of its block group one by one
    (``recently_deleted``, 20-26% of the qpconn Maildir server's CPU samples under
    ``perf`` right after 6000 deletions). The benchmark's deletions are not the servers'
    work; a server's own deletions (Postfix's queue files) still count, as they should.
    """
    aside = maildir.parent / ".set-aside"
    for sub in ("new", "tmp", "cur"):
        folder = maildir / sub
        if not folder.is_dir():
            continue
        info = folder.stat()
        aside.mkdir(exist_ok=True)
        folder.rename(aside / f"{time.monotonic_ns()}-{sub}")
        folder.mkdir(mode=info.st_mode & 0o7777)
        os.chown(folder, info.st_uid, info.st_gid)


def set_aside(workdir: Path, scratch: Path) -> None:
    """Move a stopped server's work dir into ``scratch``/.set-aside rather than deleting it
    now (why: :func:`empty_maildir`); the scratch dir is removed when the benchmark ends."""
    aside = scratch / ".set-aside"
    aside.mkdir(exist_ok=True)
    try:
        workdir.rename(aside / workdir.name)
    except OSError:
        shutil.rmtree(workdir, ignore_errors=True)


# -- Postfix's own smtpd delivering into a Maildir ----------------------------------------
#: smtpd on the bench port plus the daemons a local delivery needs; ``virtual`` writes
#: each message into one Maildir (Postfix's virtual(8) agent fsyncs before renaming)
POSTFIX_MASTER_CF = """\
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
virtual   unix  - n n - - virtual
"""

#: loopback only; bench.test is a virtual mailbox domain whose every address lands in
#: {root}/mail/Maildir/, owned by the postfix user; no rDNS-dependent restrictions
POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = {hostname}
mydestination =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
virtual_mailbox_domains = {hostname}
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = static:Maildir/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
alias_maps =
alias_database =
smtputf8_enable = no
smtpd_peername_lookup = no
biff = no
"""


def postfix_unusable() -> str | None:
    """Why a private Postfix instance cannot run here, or None when it can."""
    if shutil.which("postfix") is None:
        return "the postfix package is not installed"
    if os.geteuid() != 0:
        return "Postfix's master must be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix user"
    return None


def postfix_maildir(workdir: Path, port: int) -> Launch:
    """A private Postfix (``postfix start-fg``, its master a child of the launched process,
    stopped with ``postfix stop``) whose smtpd accepts for bench.test and delivers to a
    Maildir.

    Its 250 means the message is fsynced into Postfix's queue; the virtual agent delivers
    it to the Maildir (fsync, rename) afterwards. Between runs the queue is drained (until
    empty, bounded) and the Maildir emptied, untimed.
    """
    postfix_user = pwd.getpwnam("postfix")
    # Its processes run as the postfix user: the work dir must be reachable by it.
    for folder in (workdir.parent, workdir):
        os.chmod(folder, 0o755)
    config = workdir / "etc"
    for name in ("etc", "spool", "data", "mail"):
        (workdir / name).mkdir(exist_ok=True)
    for name in ("data", "mail"):
        os.chown(workdir / name, postfix_user.pw_uid, postfix_user.pw_gid)
    values = {
        "root": workdir, "port": port, "hostname": HOSTNAME,
        "uid": postfix_user.pw_uid, "gid": postfix_user.pw_gid,
    }  # fmt: skip
    _write(config / "main.cf", POSTFIX_MAIN_CF.format(**values))
    _write(config / "master.cf", POSTFIX_MASTER_CF.format(**values))
    argv = ["postfix", "-c", str(config), "start-fg"]

    def drain() -> None:
        spool = workdir / "spool"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            queued = sum(
                len(files)
                for sub in ("incoming", "active", "deferred", "maildrop")
                for _, _, files in os.walk(spool / sub)
            )
            if not queued:
                break
            time.sleep(0.2)
        empty_maildir(workdir / "mail" / "Maildir")

    def stop() -> None:
        # master -s calls setsid(): the process group kill would miss it and its children.
        try:
            subprocess.run(
                ["postfix", "-c", str(config), "stop"], capture_output=True, timeout=30,
                check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            master = int((workdir / "spool" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(master, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        try:
            os.kill(master, signal.SIGKILL)
        except ProcessLookupError:
            pass

    return Launch(argv, workdir, between_runs=drain, stop=stop)


def twisted_sink(workdir: Path, port: int) -> Launch:
    argv = [
        sys.executable, str(BENCH / "peers" / "twisted_sink.py"), "--port", str(port),
        "--hostname", HOSTNAME, "--log", str(workdir / "twisted.log"),
    ]  # fmt: skip
    return Launch(argv, workdir)


def aiosmtpd_sink(workdir: Path, port: int) -> Launch:
    argv = [
        sys.executable, str(BENCH / "peers" / "aiosmtpd_sink.py"), "--port", str(port),
        "--hostname", HOSTNAME,
    ]  # fmt: skip
    return Launch(argv, workdir)


def smtp_sink_factory(postfix: Postfix, max_sessions: int) -> Callable[[Path, int], Launch]:
    def prepare(workdir: Path, port: int) -> Launch:
        argv = [str(postfix.smtp_sink)]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # it refuses to run as root otherwise
        argv += ["-h", HOSTNAME, "-m", str(max_sessions), f"127.0.0.1:{port}", "1024"]
        return Launch(argv, workdir, env=postfix.env())

    return prepare


def haraka_factory(haraka: Haraka) -> Callable[[Path, int], Launch]:
    def prepare(workdir: Path, port: int) -> Launch:
        conf = workdir / "config"
        # nodes=0: one process, no cluster master in front (Haraka's "1 proc" setup).
        _write(conf / "smtp.ini", f"listen=127.0.0.1:{port}\nnodes=0\n")
        _write(conf / "plugins", "bench_no_rdns\nrcpt_to.in_host_list\nqueue/discard\n")
        _write(conf / "host_list", f"{HOSTNAME}\n")
        _write(conf / "me", f"{HOSTNAME}\n")
        defaults = haraka.root / "node_modules" / "Haraka" / "config"
        for name in ("connection.ini", "log.ini"):
            shutil.copy(defaults / name, conf / name)
        plugins = workdir / "plugins"
        plugins.mkdir(exist_ok=True)
        shutil.copy(BENCH / "peers" / "haraka" / "bench_no_rdns.js", plugins)
        env = dict(os.environ)
        env["YES_REALLY_DO_DISCARD"] = "1"  # queue/discard only discards when told so
        argv = ["node", str(haraka.bin), "-c", str(workdir)]
        return Launch(argv, workdir, env=env)

    return prepare


class Running:
    """A started server process."""

    def __init__(self, spec: ServerSpec, workdir: Path, cpu: int | None) -> None:
        self.spec = spec
        self.workdir = workdir
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.launch = spec.prepare(workdir, self.port)
        argv = self.launch.argv
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        self.output = open(workdir / "server.out", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=self.launch.cwd,
            env=self.launch.env,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.proc.pid  # taskset execs the server: same pid
        #: the CPU its load generator is pinned to (None: not pinned)
        self.gen_cpu: int | None = None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until a connection gets a 220 greeting."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited: {self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    greeting = sock.recv(512)
                    sock.sendall(b"QUIT\r\n")
                    if greeting.startswith(b"220"):
                        return
                    last = RuntimeError(f"greeting {greeting!r}")
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"{self.spec.name} not ready after {timeout}s: {last} {self.tail()}")

    def tail(self, lines: int = 5) -> str:
        self.output.flush()
        try:
            text = (self.workdir / "server.out").read_text(errors="replace")
        except OSError:
            return ""
        return " / ".join(text.strip().splitlines()[-lines:])

    def pids(self) -> list[int]:
        """The server process and its descendants (worker processes, if it has any)."""
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as handle:
                        todo += [int(child) for child in handle.read().split()]
            except OSError:
                continue
        return found

    def cpu_seconds(self, user_only: bool = False) -> float:
        """utime + stime (or utime only) of the server, all threads and worker processes,
        plus what their exited children used (cutime + cstime, once reaped).

        The children's part matters for servers whose processes come and go during a run
        (Postfix's smtpd, cleanup, virtual... are reaped by its master); a worker that
        exited unreaped, or whose parent exited, is not counted.
        """
        ticks = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
            # cutime and cstime (fields 16 and 17): children exited and waited for.
            ticks += int(fields[11]) + int(fields[13])
            if not user_only:
                ticks += int(fields[12]) + int(fields[14])
        return ticks / CLOCK_TICKS

    def runqueue_seconds(self) -> float:
        """Time the server's threads were ready to run but waited for a CPU (the second
        field of /proc/<pid>/task/<tid>/schedstat), summed over its processes.

        On a shared machine this tells a server that was slow from one that was kept
        off its CPU by other processes pinned there too (another benchmark's server).
        """
        total_ns = 0
        for pid in self.pids():
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                        total_ns += int(handle.read().split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        return total_ns / 1e9

    def status_kib(self, key: str) -> int:
        """A /proc/<pid>/status figure in KiB (VmRSS, VmHWM), summed over worker processes."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as handle:
                    total += next(
                        int(line.split()[1]) for line in handle if line.startswith(key + ":")
                    )
            except (OSError, StopIteration):
                continue
        return total

    def between_runs(self) -> None:
        if self.launch.between_runs is not None:
            self.launch.between_runs()

    def stop(self) -> None:
        if self.launch.stop is not None:
            self.launch.stop()
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        self.output.close()
