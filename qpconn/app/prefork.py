"""``twistd qpconn --workers N``: N worker processes serving the same listening sockets.

How the sockets are shared, and why this way
--------------------------------------------
The parent (the ``twistd`` process) binds every ``--listen`` endpoint itself, stops
reading from them, and hands the very same sockets to each worker as inherited file
descriptors; a worker adopts them with ``reactor.adoptStreamPort`` (through Twisted's
``AdoptedStreamServerEndpoint``). The kernel gives each new connection to whichever
worker accepts it first.

``SO_REUSEPORT`` (every worker binding its own socket on the same port) was rejected:

* Twisted's endpoint strings have no way to ask for it, so each listener kind would need
  its own binding code;
* it cannot work for ``tcp:0`` (each worker would get a different port), for Unix
  sockets, or for ``systemd:`` socket activation, where the socket comes from outside;
* a privileged port (25) bound by root before ``--uid`` drops privileges could not be
  re-bound by an unprivileged worker that restarts later.

Binding once in the parent works for every one of those: the parent binds as root in
``privilegedStartService`` and the workers, started after the privilege drop, only
inherit what was bound. A restarted worker inherits the same sockets, so restarts never
close a listener, and connections waiting in the backlog are served by the survivors.

Supervision and signals
-----------------------
The parent restarts a worker that exits while the server runs (after ``restart_delay``
seconds, so a worker that cannot start does not spin), forwards SIGHUP to every worker
(each reloads its config, :mod:`qpconn.app.reload`), and on SIGTERM stops: each worker gets
SIGTERM and drains its own sessions (:mod:`qpconn.server.shutdown`); the parent waits for
them, then exits. A worker whose parent has gone away stops by itself.

Logs and metrics
----------------
Workers write their log events as JSON lines on their standard output, those of a reactor
turn in one write (:mod:`qpconn.log.relay`: plain JSON for flat events, Twisted's
``eventAsJSON`` for the rest); the parent reads them and publishes them again in its own log
with ``worker_pid`` (and ``log_system`` ``worker-PID``) added, so ``--logfile`` and
``--logger`` see every worker's structured events. With ``--metrics`` the workers count in
prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set to a private
directory the parent creates and removes) and the parent's metrics endpoint sums every
worker's figures, those of workers that have exited included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from qpconn.app.service import describe_address
from qpconn.log.relay import decode
from qpconn.server.backlog import with_default_backlog
from qpconn.server.fastpath.listening import fail_start_on_bind_error
from qpconn.server.lmtp import LMTP_PREFIX
from qpconn.server.peerinfo import LookupSettings
from qpconn.server.proxy import ProxySettings

__all__ = ["PreforkService", "SHAREABLE", "check_shareable", "worker_spec", "worker_main"]

log = Logger(namespace="qpconn.prefork")

#: endpoint kinds whose socket a worker can adopt as it is (``ssl:`` would lose its TLS)
SHAREABLE = ("tcp", "tcp6", "unix", "systemd")

#: seconds a stopping parent waits for its workers before SIGKILL (they drain sessions
#: for ``shutdown_timeout``, 30 s by default, first)
STOP_GRACE = 60.0


def worker_spec(
    config_dir: str | None,
    hostname: str | None,
    lookups: LookupSettings,
    proxy: ProxySettings,
    tls_cert: str | None,
    tls_key: str | None,
    tracing: bool = False,
) -> dict[str, Any]:
    """What a worker needs to build the same server as the command line describes (JSON).

    With ``tracing`` each worker process builds its own tracer provider (and exporter
    threads) from the ``OTEL_*`` environment it inherits (qpconn.app.tracing).
    """
    return {
        "config": os.path.abspath(config_dir) if config_dir else None,
        "hostname": hostname,
        "lookups": asdict(lookups),
        "proxy": {"enabled": proxy.enabled, "trusted": list(proxy.trusted),
                  "timeout": proxy.timeout},
        "tls_cert": os.path.abspath(tls_cert) if tls_cert else None,
        "tls_key": os.path.abspath(tls_key) if tls_key else None,
        "tracing": tracing,
    }  # fmt: skip


def check_shareable(listen: Sequence[str]) -> None:
    """ValueError unless a worker can adopt every listener's socket as it is."""
    for description in listen:
        kind = description.removeprefix(LMTP_PREFIX).split(":", 1)[0]
        if kind not in SHAREABLE:
            raise ValueError(
                f"--workers shares {', '.join(SHAREABLE)} listeners; not {description!r} "
                "(offer STARTTLS on a tcp listener instead, or run without --workers)"
            )


class _Unused(protocol.Factory):
    """The parent never reads from its listeners; a connection reaching it is a bug."""

    noisy = False

    def logPrefix(self) -> str:
        # Twisted's "<prefix> starting on N" line (debug chatter: qpconn.log.level); the
        # parent's own line says "listening on ADDRESS for N workers".
        return "workers-listener"

    def buildProtocol(self, addr: Any) -> None:
        return None


class _WorkerProcess(protocol.ProcessProtocol):
    """One worker: relays its JSON log lines into the parent's log; tells the parent when
    it ends."""

    def __init__(self, parent: PreforkService) -> None:
        self.parent = parent
        self.buffer = b""
        self.pid: int | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        # one record per line (qpconn.log.relay); JSON text never holds a raw newline
        *records, self.buffer = self.buffer.split(b"\n")
        for record in records:
            self.relay(record)

    def relay(self, record: bytes) -> None:
        try:
            event = decode(record)
        except ValueError:
            text = record.decode("utf-8", "replace").strip("\x1e\x1f \r\n")
            event = {"log_format": "{line}", "line": text, "log_namespace": "qpconn.prefork"}
        if event is None:
            return
        event["worker_pid"] = self.pid
        event["log_system"] = f"worker-{self.pid}"
        globalLogPublisher(event)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.warn("worker {worker_pid}: {line}", worker_pid=self.pid, line=line)

    def processEnded(self, reason: Failure) -> None:
        if self.buffer:
            self.relay(self.buffer)
            self.buffer = b""
        self.parent.worker_ended(self, reason)
        self.ended.callback(None)


class PreforkService(MultiService):
    """The parent of ``workers`` worker processes; see the module docstring."""

    def __init__(
        self,
        listen: Sequence[str],
        spec: dict[str, Any],
        workers: int,
        metrics: str | None = None,
        restart_delay: float = 1.0,
    ) -> None:
        super().__init__()
        self.setName("qpconn")
        self.listen = list(listen)
        self.spec = spec
        self.count = workers
        self.metrics_endpoint = metrics
        self.restart_delay = restart_delay
        self.ports: list[tuple[Any, int, bool]] = []  # (port, address family, lmtp)
        self.workers: dict[int, _WorkerProcess] = {}
        self.multiproc_dir: str | None = None
        self._previous_hup: Any = None
        from twisted.internet import reactor

        self.reactor: Any = reactor
        check_shareable(self.listen)
        self._endpoints = [
            (
                serverFromString(reactor, with_default_backlog(d.removeprefix(LMTP_PREFIX))),
                d.startswith(LMTP_PREFIX),
            )
            for d in self.listen
        ]

    # -- start ---------------------------------------------------------------------------
    def privilegedStartService(self) -> None:
        """Bind every listener now, before twistd sheds root (``--uid``)."""
        for endpoint, lmtp in self._endpoints:
            results: list[Any] = []
            endpoint.listen(_Unused()).addBoth(results.append)
            if not results or isinstance(results[0], Failure):
                for port, _, _ in self.ports:
                    port.stopListening()
                if results:
                    results[0].raiseException()
                raise RuntimeError(f"listener {endpoint!r} did not bind at once")
            port = results[0]
            port.stopReading()  # the parent holds the socket; only workers accept
            family = getattr(port, "addressFamily", socket.AF_INET)
            self.ports.append((port, family, lmtp))
            log.info("listening on {address} for {count} workers",
                     address=describe_address(port.getHost(), lmtp), count=self.count)  # fmt: skip
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        if self.metrics_endpoint:
            # Created after the privilege drop, so the workers (same user) can write there.
            self.multiproc_dir = tempfile.mkdtemp(prefix="qpconn-metrics-")
            self._serve_metrics()
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_hup)
        for _ in range(self.count):
            self.spawn()

    def _serve_metrics(self) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector
        from twisted.web.server import Site

        from qpconn.app.metrics import MetricsResource

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiproc_dir)
        site = Site(MetricsResource(_Aggregate(registry)))
        site.noisy = False
        service = StreamServerEndpointService(
            serverFromString(self.reactor, self.metrics_endpoint), site
        )
        fail_start_on_bind_error(service)  # a port in use stops the start
        service.setName("qpconn-metrics")
        service.setServiceParent(self)

    def spawn(self) -> _WorkerProcess:
        """Start one worker that inherits every listening socket."""
        worker = _WorkerProcess(self)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        listeners = []
        for index, (port, family, lmtp) in enumerate(self.ports):
            child_fds[3 + index] = port.fileno()
            listeners.append([3 + index, int(family), lmtp])
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        if self.multiproc_dir:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.multiproc_dir
        spec = dict(self.spec, listeners=listeners, parent=os.getpid(),
                    metrics=bool(self.multiproc_dir))  # fmt: skip
        argv = [sys.executable, "-m", "qpconn.app.prefork", json.dumps(spec)]
        self.reactor.spawnProcess(
            worker, sys.executable, argv, env=env, path=os.getcwd(), childFDs=child_fds
        )
        self.workers[worker.pid] = worker  # type: ignore[index]
        log.info("started worker {worker_pid}", worker_pid=worker.pid)
        return worker

    # -- supervision ---------------------------------------------------------------------
    def worker_ended(self, worker: _WorkerProcess, reason: Failure) -> None:
        self.workers.pop(worker.pid, None)  # type: ignore[arg-type]
        status = getattr(reason.value, "exitCode", None)
        signum = getattr(reason.value, "signal", None)
        if self.multiproc_dir:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid, self.multiproc_dir)
        if not self.running:
            log.info("worker {worker_pid} stopped", worker_pid=worker.pid)
            return
        log.warn(
            "worker {worker_pid} exited (status {status}, signal {signal}); restarting in "
            "{delay}s", worker_pid=worker.pid, status=status, signal=signum,
            delay=self.restart_delay,
        )  # fmt: skip
        self.reactor.callLater(self.restart_delay, self._respawn)

    def _respawn(self) -> None:
        if self.running and len(self.workers) < self.count:
            self.spawn()

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.signal_workers, signal.SIGHUP)

    def signal_workers(self, signum: int) -> None:
        """Send ``signum`` to every worker (SIGHUP: each one reloads its config)."""
        log.info("forwarding signal {signum} to {count} workers", signum=signum,
                 count=len(self.workers))  # fmt: skip
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(signum)  # type: ignore[union-attr]
            except Exception:  # already gone: processEnded will follow
                pass

    # -- stop ----------------------------------------------------------------------------
    def stopService(self) -> defer.Deferred[None]:
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        stopping = super().stopService()  # running is False now: no more restarts
        ended = [worker.ended for worker in self.workers.values()]
        self.signal_workers(signal.SIGTERM)
        kill = self.reactor.callLater(STOP_GRACE, self.signal_workers, signal.SIGKILL)

        def done(_: Any) -> None:
            if kill.active():
                kill.cancel()
            for port, _, _ in self.ports:
                port.stopListening()
            self.ports = []
            if self.multiproc_dir:
                shutil.rmtree(self.multiproc_dir, ignore_errors=True)
                self.multiproc_dir = None

        result = defer.gatherResults([defer.maybeDeferred(lambda: stopping), *ended])
        return result.addCallback(done)


class _Aggregate:
    """The parent's figures: every worker's, read from the multiprocess directory."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


# -- the worker process -------------------------------------------------------------------
def _build_worker(spec: dict[str, Any]) -> MultiService:
    from twisted.internet import reactor

    from qpconn.app.service import add_operations, make_service
    from qpconn.server.lmtp import LMTPListenerFactory

    proxy = spec["proxy"]
    top = make_service(
        [],
        spec["config"],
        hostname=spec["hostname"],
        lookups=LookupSettings(**spec["lookups"]),
        proxy=ProxySettings(proxy["enabled"], proxy["trusted"], proxy["timeout"]),
        tls_cert=spec["tls_cert"],
        tls_key=spec["tls_key"],
    )
    factory = top.factory  # type: ignore[attr-defined]
    for fd, family, lmtp in spec["listeners"]:
        endpoint = AdoptedStreamServerEndpoint(reactor, fd, family)
        listener = StreamServerEndpointService(
            endpoint, LMTPListenerFactory(factory) if lmtp else factory
        )
        fail_start_on_bind_error(listener)  # a port in use stops the start
        listener.setServiceParent(top)
    # SIGHUP reloads this worker's config; --tracing: its sessions' spans
    add_operations(top, None, tracing=spec.get("tracing", False))
    if spec["metrics"]:
        from qpconn.app.metrics import ServerMetrics

        ServerMetrics(factory, multiprocess=True).attach()
    return top


class _Orphaned(Service):
    """Stops the worker when its parent is gone (a SIGKILLed parent sends no SIGTERM)."""

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        self.loop: Any = None

    def startService(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import LoopingCall

        super().startService()

        def check() -> None:
            if os.getppid() != self.parent_pid:
                log.warn("parent {parent} is gone; stopping", parent=self.parent_pid)
                reactor.stop()

        self.loop = LoopingCall(check)
        self.loop.start(1.0)

    def stopService(self) -> None:
        super().stopService()
        if self.loop is not None and self.loop.running:
            self.loop.stop()


def worker_main(argv: Sequence[str]) -> int:
    """Run one worker: ``python -m qpconn.app.prefork SPEC_JSON`` (started by the parent)."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from qpconn.log.relay import RelayObserver

    spec = json.loads(argv[0])
    globalLogBeginner.beginLoggingTo(
        [RelayObserver(sys.stdout)], redirectStandardIO=False  # one write per reactor turn
    )
    top = _build_worker(spec)
    _Orphaned(spec["parent"]).setServiceParent(top)

    def start() -> None:
        try:
            top.privilegedStartService()
            top.startService()
        except Exception:
            log.failure("worker could not start")
            reactor.stop()
            return
        log.info("worker {worker_pid} ready", worker_pid=os.getpid())

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
