"""Debian's real rspamd on a free loopback port, configured to work offline.

The instance runs Debian's own ``/etc/rspamd/rspamd.conf`` (so the rules are the ones an
administrator gets) with rspamd's override directories pointed at a temporary directory
(``--var LOCAL_CONFDIR=...``) where this module writes:

* one normal worker on ``127.0.0.1:PORT``; no controller, proxy or fuzzy worker;
* every module that needs the network or redis disabled (RBLs, SURBL, fuzzy, neural,
  SPF, DKIM, DMARC, ASN, replies, ratelimit, greylisting, reputation, updates ...): nothing
  may wait on a DNS server the test machine cannot reach;
* ``milter_headers`` asked for the fields the plugin passes on, also for local clients;
* multimap rules that force each action rspamd has, keyed on the Subject
  (``qpconn-test-soft`` -> ``soft reject``, ``-subject`` -> ``rewrite subject``,
  ``-header`` -> ``add header``, ``-grey`` -> ``greylist``), so every branch of the
  plugin is exercised against the real daemon's answers. GTUBE is rspamd's own reject.

The compiled hyperscan database lives in ``cache_dir``: the first start compiles it (about
20 s on a busy machine), later ones given the same directory load it in a second or two.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.process import free_port

__all__ = ["RealRspamd", "rspamd_usable", "real_rspamd", "OFFLINE_MODULES"]

#: modules that would ask the network or redis; disabled in the test instance
OFFLINE_MODULES = (
    "rbl", "surbl", "fuzzy_check", "neural", "spf", "dkim", "dmarc", "asn", "emails",
    "mx_check", "phishing", "replies", "ratelimit", "greylist", "dcc", "reputation",
    "url_redirector", "history_redis", "clickhouse", "elastic", "metric_exporter",
    "rspamd_update", "arc", "dkim_signing", "bimi", "p0f", "antivirus", "external_services",
)  # fmt: skip

#: (symbol, subject text, forced action, smtp message or None)
FORCED = (
    ("QPCONN_SOFT", "qpconn-test-soft", "soft reject", "Not now, later"),
    ("QPCONN_SUBJECT", "qpconn-test-subject", "rewrite subject", None),
    ("QPCONN_HEADER", "qpconn-test-header", "add header", None),
    ("QPCONN_GREY", "qpconn-test-grey", "greylist", None),
)


def rspamd_usable() -> str | None:
    """Why the real rspamd cannot run here, or None."""
    if shutil.which("rspamd") is None:
        return "rspamd is not installed (apt-get install rspamd)"
    if not os.path.exists("/etc/rspamd/rspamd.conf"):
        return "rspamd is installed without /etc/rspamd/rspamd.conf"
    return None


@dataclass
class RealRspamd:
    """A running instance: its address for the plugin, its process and its log."""

    process: subprocess.Popen[bytes]
    port: int
    log: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL the main process and its workers (the group this module started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def log_text(self) -> str:
        with open(self.log, errors="replace") as handle:
            return handle.read()


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def write_config(root: str, port: int, cache_dir: str) -> None:
    """The override files (see the module docstring) under ``root``."""
    # Everything rspamd keeps (control socket, history, stats) is the instance's own but
    # the compiled hyperscan database, which two instances can share.
    _write(f"{root}/override.d/options.inc", f'hs_cache_dir = "{cache_dir}/";\n')
    _write(f"{root}/override.d/worker-normal.inc",
           f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n')  # fmt: skip
    for worker in ("controller", "proxy", "fuzzy"):
        _write(f"{root}/override.d/worker-{worker}.inc", "enabled = false;\ncount = -1;\n")
    _write(f"{root}/override.d/logging.inc",
           f'type = "file";\nfilename = "{root}/rspamd.log";\nlevel = "info";\n')  # fmt: skip
    for module in OFFLINE_MODULES:
        _write(f"{root}/local.d/{module}.conf", "enabled = false;\n")
    _write(f"{root}/local.d/milter_headers.conf",
           'use = ["x-spamd-result", "x-rspamd-queue-id", "x-rspamd-action"];\n'
           "skip_local = false;\nskip_authenticated = false;\n")  # fmt: skip
    rules = []
    for symbol, subject, action, message in FORCED:
        _write(f"{root}/maps/{symbol.lower()}.map", f"/{subject}/\n")
        extra = f' message = "{message}";' if message else ""
        rules.append(
            f'{symbol} {{ type = "header"; header = "Subject"; regexp = true; '
            f'map = "{root}/maps/{symbol.lower()}.map"; action = "{action}";{extra} }}'
        )
    _write(f"{root}/local.d/multimap.conf", "\n".join(rules) + "\n")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as answer:
            return answer.read().strip() == b"pong"
    except OSError:
        return False


@contextlib.contextmanager
def real_rspamd(root: str, cache_dir: str, timeout: float = 120.0) -> Iterator[RealRspamd]:
    """Start rspamd (see the module docstring) and wait, at most ``timeout`` seconds, for
    its worker to answer ``/ping``; stop it (and its workers) afterwards.

    Raises RuntimeError, with the end of its log, if it exits or never answers.
    """
    port = free_port()
    write_config(root, port, cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    command = [
        shutil.which("rspamd") or "rspamd", "-f", "-c", "/etc/rspamd/rspamd.conf",
        f"--var=LOCAL_CONFDIR={root}", f"--var=DBDIR={root}", f"--var=RUNDIR={root}",
        f"--var=LOGDIR={root}",
    ]  # fmt: skip
    if os.geteuid() == 0:  # rspamd refuses to keep root unless told whom to run as
        command += ["-u", "root", "-g", "root"]
    log_path = os.path.join(root, "rspamd.log")
    with open(os.path.join(root, "stdout.log"), "wb") as out:  # the child keeps its copy
        process = subprocess.Popen(
            command, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    instance = RealRspamd(process, port, log_path)
    try:
        deadline = time.monotonic() + timeout
        while not _ready(port):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = _tail(log_path) or _tail(os.path.join(root, "stdout.log"))
                raise RuntimeError(f"rspamd did not start (exit {process.poll()}): {tail}")
            time.sleep(0.2)
        yield instance
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                instance.kill()


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()[-2000:]
    except OSError:
        return ""
