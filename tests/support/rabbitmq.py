"""A private RabbitMQ node (Debian's ``rabbitmq-server``) on loopback, started by the tests.

Nothing of the system's RabbitMQ is used or touched: the node has its own name, its own
AMQP and distribution ports, its own Mnesia and log directories, config file, plugin
list and Erlang cookie (``HOME`` is the temp dir), and it talks to its own ``epmd`` on a
private port (``ERL_EPMD_PORT``), which this module starts and stops. A system node the
package may have started therefore cannot clash with it, whatever its state.

The node runs ``/usr/lib/rabbitmq/bin/rabbitmq-server`` in the foreground (not Debian's
wrapper in ``/usr/sbin``, which switches to the ``rabbitmq`` user and ``/var/lib``) in
a process group of its own, so that :meth:`RabbitNode.kill` can SIGKILL the script and
the Erlang VM together, and :meth:`RabbitNode.freeze` can stop the whole broker
(SIGSTOP) to make it hang without closing its sockets.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from tests.support.process import free_port

SBIN = "/usr/lib/rabbitmq/bin"
SERVER = os.path.join(SBIN, "rabbitmq-server")
CTL = os.path.join(SBIN, "rabbitmqctl")
#: the distribution (Erlang node-to-node and CLI) sockets bind loopback only
LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"
_serial = itertools.count(1)


def rabbitmq_missing() -> str | None:
    """Why no private node can run here, or None when it can."""
    if not (os.access(SERVER, os.X_OK) and os.access(CTL, os.X_OK)):
        return "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
    if shutil.which("epmd") is None:
        return "epmd (erlang-base, a dependency of rabbitmq-server) is not installed"
    return None


class RabbitNode:
    """One node: start, kill (SIGKILL), freeze/thaw (SIGSTOP/SIGCONT) and restart it."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.name = f"qpconn-test-{os.getpid()}-{next(_serial)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.process: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(directory, "rabbitmq.log")
        config = os.path.join(directory, "rabbitmq.conf")
        with open(config, "w") as handle:
            handle.write(
                f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
                "disk_free_limit.absolute = 10MB\n"
                "log.console = true\n"
                "log.file = false\n"
            )
        with open(os.path.join(directory, "enabled_plugins"), "w") as handle:
            handle.write("[].\n")
        open(os.path.join(directory, "rabbitmq-env.conf"), "w").close()
        self.env = {
            **os.environ,
            "HOME": directory,  # the Erlang cookie the node and rabbitmqctl share
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": os.path.join(directory, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(directory, "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_CONFIG_FILE": config,
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(directory, "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(directory, "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(directory, "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": os.path.join(directory, "rabbitmq.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": LOOPBACK_DIST,
            "RABBITMQ_CTL_ERL_ARGS": LOOPBACK_DIST,
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    # -- life cycle -----------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> None:
        """Start the node (and our epmd the first time); block until it serves AMQP."""
        if self.epmd is None or self.epmd.poll() is not None:
            self.epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=self.env, start_new_session=True,
            )  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [SERVER], cwd=self.directory, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._await_startup(timeout)

    def _await_startup(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _attempt in range(200):  # bounded in count as well as in time
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited early; see {self.log_path}")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self._accepts():
                done = self.ctl("await_startup", timeout=max(5.0, left))
                if done.returncode == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"RabbitMQ node {self.name} not up after {timeout}s: {self.log_path}")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
        """``rabbitmqctl -n NODE args...``, bounded in time."""
        try:
            return subprocess.run(
                [CTL, "-n", self.name, *args], env=self.env, capture_output=True,
                timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 124, b"", b"timed out")

    def _signal_group(self, signum: int) -> None:
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL the broker (script and Erlang VM): a crash, no goodbye to clients."""
        if self.process is None:
            return
        self._signal_group(signal.SIGCONT)  # a frozen group dies just as well, but be sure
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=30)
        # the VM is the script's child: wait until nothing of the group is left
        for _ in range(100):
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.process = None

    def freeze(self) -> None:
        """SIGSTOP the broker: its sockets stay open and nothing is ever answered."""
        self._signal_group(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        self._signal_group(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the node (SIGTERM, then SIGKILL after a grace period) and our epmd."""
        if self.process is not None:
            self._signal_group(signal.SIGCONT)
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            self.kill()
        if self.epmd is not None:
            self.epmd.kill()
            self.epmd.wait(timeout=10)
            self.epmd = None


@contextmanager
def rabbitmq_node(directory: str) -> Iterator[RabbitNode]:
    """A started :class:`RabbitNode` in ``directory``, always stopped afterwards."""
    node = RabbitNode(directory)
    try:
        node.start()
        yield node
    finally:
        node.stop()
