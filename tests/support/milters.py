"""Real milters from Debian for the tests: OpenDKIM and rspamd, each started on a free
loopback port with a configuration written into a temporary directory, and stopped
afterwards. Each ``start_*`` returns None (and why, in ``skipped``) when the program is
not installed or does not come up, so the tests can skip with the precise reason.

* OpenDKIM (``opendkim``, ``opendkim-tools``): ``Mode sv`` for ``example.org`` with a
  key made by ``opendkim-genkey``; mail from 127.0.0.1 (``InternalHosts``) is signed,
  mail from any other client is verified. The public key comes from a
  ``TestPublicKeys`` file (OpenDKIM's own way to verify without DNS), so nothing leaves
  the machine.
* rspamd (``rspamd``): Debian's configuration with our overrides (``--var`` points its
  local and run directories at the temporary one): only the proxy worker, in milter
  mode, scanning by itself (``self_scan``) on a loopback port; no controller, no normal
  worker, no Redis; DNS goes to a loopback port nobody answers on, so the modules that
  need the network fail fast instead of waiting.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

from tests.support.process import free_port


@dataclass
class RunningMilter:
    process: subprocess.Popen[bytes]
    address: str
    directory: str
    log: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def output(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as handle:
            return handle.read()


skipped: dict[str, str] = {}


def _program(name: str) -> str | None:
    return shutil.which(name) or next(
        (path for path in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(path)),
        None,
    )


def _wait_for(process: subprocess.Popen[bytes], port: int, timeout: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def _start(name: str, command: list[str], port: int, directory: str) -> RunningMilter | None:
    log = os.path.join(directory, f"{name}.log")
    with open(log, "wb") as output:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   cwd=directory)  # fmt: skip
    milter = RunningMilter(process, f"inet:127.0.0.1:{port}", directory, log)
    if name == "rspamd":
        milter.log = os.path.join(directory, "log", "rspamd.log")
    if _wait_for(process, port):
        return milter
    milter.stop()
    skipped[name] = f"{name} did not come up on port {port}: {milter.output()[-2000:]}"
    return None


def dkim_public_record(txt_file: str) -> str:
    """The TXT record of opendkim-genkey's ``SELECTOR.txt`` (BIND format), as one string."""
    with open(txt_file, encoding="ascii") as handle:
        return "".join(re.findall(r'"([^"]*)"', handle.read()))


def start_opendkim(directory: str, domain: str = "example.org", selector: str = "test"
                   ) -> RunningMilter | None:  # fmt: skip
    opendkim, genkey = _program("opendkim"), _program("opendkim-genkey")
    if opendkim is None or genkey is None:
        skipped["opendkim"] = "OpenDKIM is not installed (apt-get install opendkim opendkim-tools)"
        return None
    subprocess.run([genkey, "-D", directory, "-d", domain, "-s", selector, "-b", "1024"],
                   check=True, capture_output=True)  # fmt: skip
    keys = os.path.join(directory, "public-keys")
    with open(keys, "w", encoding="ascii") as handle:
        record = dkim_public_record(os.path.join(directory, f"{selector}.txt"))
        handle.write(f"{selector}._domainkey.{domain} {record}\n")
    port = free_port()
    conf = os.path.join(directory, "opendkim.conf")
    with open(conf, "w", encoding="ascii") as handle:
        handle.write(
            "Mode sv\n"
            f"Domain {domain}\n"
            f"Selector {selector}\n"
            f"KeyFile {directory}/{selector}.private\n"
            f"Socket inet:{port}@127.0.0.1\n"
            "Background no\n"
            "Syslog no\n"
            "InternalHosts 127.0.0.1\n"
            f"TestPublicKeys {keys}\n"
            "Canonicalization relaxed/simple\n"
            "RequireSafeKeys no\n"
            f"PidFile {directory}/opendkim.pid\n"
        )
    return _start("opendkim", [opendkim, "-f", "-x", conf], port, directory)


def start_rspamd(directory: str) -> RunningMilter | None:
    rspamd = _program("rspamd")
    if rspamd is None or not os.path.isfile("/etc/rspamd/rspamd.conf"):
        skipped["rspamd"] = "rspamd is not installed (apt-get install rspamd)"
        return None
    port = free_port()
    for sub in ("local.d", "override.d", "run", "db", "log"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    override = os.path.join(directory, "override.d")
    local = os.path.join(directory, "local.d")
    files = {
        f"{override}/worker-proxy.inc": (
            f'bind_socket = "127.0.0.1:{port}";\nmilter = yes;\ncount = 1;\ntimeout = 60s;\n'
            'upstream "local" {\n  default = yes;\n  self_scan = yes;\n}\n'
        ),
        f"{override}/worker-normal.inc": "enabled = false;\n",
        f"{override}/worker-controller.inc": "enabled = false;\n",
        f"{override}/worker-fuzzy.inc": "enabled = false;\n",
        f"{override}/logging.inc": f'type = "file";\nfilename = "{directory}/log/rspamd.log";\n'
        'level = "info";\n',
        f"{override}/options.inc": (
            'dns {\n  nameserver = ["127.0.0.1:1"];\n  timeout = 0.2s;\n  retransmits = 1;\n}\n'
            "local_addrs = [];\n"
            # a busy test machine must not turn a scan into a timeout verdict
            "task_timeout = 60s;\n"
        ),
        f"{local}/milter_headers.conf": (
            'use = ["x-spamd-result", "x-rspamd-server", "x-rspamd-queue-id", '
            '"authentication-results"];\nskip_local = false;\nskip_authenticated = false;\n'
        ),
        f"{local}/redis.conf": "",
    }
    for path, text in files.items():
        with open(path, "w", encoding="ascii") as handle:
            handle.write(text)
    command = [
        rspamd, "-f", "-u", "root", "-g", "root", "-c", "/etc/rspamd/rspamd.conf",
        f"--var=LOCAL_CONFDIR={directory}", f"--var=RUNDIR={directory}/run",
        f"--var=DBDIR={directory}/db", f"--var=LOGDIR={directory}/log",
    ]  # fmt: skip
    if os.geteuid() != 0:
        command[2:6] = []
    return _start("rspamd", command, port, directory)
