"""Prometheus metrics for a running server (``twistd qpconn --metrics ENDPOINT``).

Figures come from three places, chosen so that no hot path pays for metrics it does not
serve:

* the hook runner's observer (:attr:`qpconn.hooks.runner.HookRunner.observer`): the latency and
  result of every plugin call, by hook and plugin;
* the peer lookups' observer (:attr:`qpconn.server.peerinfo.PeerInfo.observer`): reverse
  DNS and ident latency and outcomes (timeouts included);
* the session's own structured log events: the per-transaction summary line
  (``event="transaction"``), the refusals at connect, MAIL and RCPT
  (``event="rejection"``), the connections refused by a connection limit
  (``event="connection_refused"``) and the sessions ended by a deadline
  (``event="deadline"``: ``command_deadline``, ``min_data_rate``, ``max_session_time``, or
  ``timeout`` for a client that did not take its replies); and the events of the server's
  plugins (``event="limit_refused"``, ``"redis_outage"``, ``"http_queue"``, and
  ``"plugin_outcome"``: what rspamd said, what the next hop said of a recipient, a
  scanner or next hop that could not be asked), whose log source is
  the server itself (:meth:`qpconn.hooks.plugin.Plugin.attach`). Counting the events the
  log already carries means the metrics and the log can never disagree about what happened.

Connections open and total are read from the factory when scraped. Each
:class:`ServerMetrics` has its own registry, so several servers (or tests) in one
process do not mix their figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, LogPublisher, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from qpconn.hooks.results import HookOutcome
from qpconn.server.fastpath.listening import fail_start_on_bind_error

if TYPE_CHECKING:
    from qpconn.server.factory import SMTPFactory

__all__ = ["ServerMetrics", "MetricsResource", "metrics_service", "reply_class"]

#: seconds; plugin calls are mostly sub-millisecond, DNS-bound ones up to the timeouts
HOOK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LOOKUP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10)


def reply_class(code: int | None) -> str:
    """``2xx``, ``4xx`` or ``5xx`` (``none`` when there was no reply code)."""
    return f"{code // 100}xx" if code else "none"


class _FactoryCollector:
    """Reads the live connection figures from the factory at scrape time."""

    def __init__(self, factory: SMTPFactory) -> None:
        self.factory = factory

    def collect(self) -> Any:
        total = CounterMetricFamily("qpconn_connections", "Connections accepted since start-up")
        total.add_metric([], self.factory.connections_total)
        yield total
        now = GaugeMetricFamily("qpconn_connections_open", "Connections open now")
        now.add_metric([], len(self.factory.sessions))
        yield now


@implementer(ILogObserver)
class ServerMetrics:
    """The metrics of one factory; :meth:`attach` starts collecting them.

    A reload (:mod:`qpconn.app.reload`) builds a new hook runner; it carries the observer
    over, so the figures continue across reloads.
    """

    def __init__(
        self,
        factory: SMTPFactory,
        registry: CollectorRegistry | None = None,
        multiprocess: bool = False,
    ) -> None:
        self.factory = factory
        self.registry = registry or CollectorRegistry()
        r = self.registry
        #: a worker of ``--workers`` (qpconn.app.prefork): its figures go to
        #: prometheus-client's multiprocess files and another process serves them, so the
        #: connection figures are counted as they change instead of read at scrape time
        self.multiprocess = multiprocess
        if multiprocess:
            self.connections = Counter(
                "qpconn_connections", "Connections accepted since start-up", registry=r
            )
            self.connections_open = Gauge(
                "qpconn_connections_open", "Connections open now", registry=r,
                multiprocess_mode="livesum",
            )  # fmt: skip
        else:
            self.registry.register(_FactoryCollector(factory))
        self.hook_seconds = Histogram(
            "qpconn_hook_duration_seconds",
            "Time a plugin took to answer a hook",
            ["hook", "plugin"],
            buckets=HOOK_BUCKETS,
            registry=r,
        )
        self.hook_results = Counter(
            "qpconn_hook_results",
            "What plugins answered, by hook, plugin and result (DECLINED included)",
            ["hook", "plugin", "result"],
            registry=r,
        )
        self.transactions = Counter(
            "qpconn_transactions",
            "Messages that reached the end of DATA, by result, deciding hook and reply class",
            ["result", "hook", "reply_class"],
            registry=r,
        )
        self.rejections = Counter(
            "qpconn_rejections",
            "Connections, senders and recipients refused at connect, mail and rcpt",
            ["hook", "reply_class"],
            registry=r,
        )
        self.connections_refused = Counter(
            "qpconn_connections_refused",
            "Connections refused with 421 by a connection limit, by the setting that refused",
            ["limit"],
            registry=r,
        )
        self.deadlines = Counter(
            "qpconn_deadlines",
            "Sessions ended by a deadline (421 4.4.2, or aborted when not reading), by the "
            "setting that ended them",
            ["limit"],
            registry=r,
        )
        self.limit_refusals = Counter(
            "qpconn_limit_refusals",
            "Sessions, senders and recipients refused by the limit plugin, by limit",
            ["limit"],
            registry=r,
        )
        self.redis_outages = Counter(
            "qpconn_redis_outages",
            "Times a plugin's Redis stopped answering (one per outage), by plugin",
            ["plugin"],
            registry=r,
        )
        self.plugin_outcomes = Counter(
            "qpconn_plugin_outcomes",
            "What checking plugins concluded (rspamd's action, a recipient verified...)",
            ["plugin", "outcome"],
            registry=r,
        )
        self.http_queue = Counter(
            "qpconn_http_queue_responses",
            "queue/http deliveries by what the endpoint did: 2xx, 4xx, 5xx, timeout, refused",
            ["plugin", "outcome"],
            registry=r,
        )
        self.milter_verdicts = Counter(
            "qpconn_milter_verdicts",
            "What milters decided, by milter address, stage and verdict (accept, reject, "
            "tempfail, discard, shutdown, continue at the end of a message, error)",
            ["milter", "stage", "verdict"],
            registry=r,
        )
        self.bytes_received = Counter(
            "qpconn_received_bytes", "Octets of message text received", registry=r
        )
        self.recipients = Counter(
            "qpconn_recipients", "Recipients of messages that reached the end of DATA", registry=r
        )
        self.queue = Counter(
            "qpconn_queue_outcomes",
            "Queue results: queued (2xx), deferred (4xx), refused (5xx), by plugin",
            ["plugin", "outcome"],
            registry=r,
        )
        self.lookup_seconds = Histogram(
            "qpconn_lookup_duration_seconds",
            "Peer lookups before the connect hook (rdns, ident)",
            ["kind"],
            buckets=LOOKUP_BUCKETS,
            registry=r,
        )
        self.lookups = Counter(
            "qpconn_lookups",
            "Peer lookups by kind and outcome (ok, timeout, nxdomain, none, ...)",
            ["kind", "outcome"],
            registry=r,
        )
        self._publisher: LogPublisher | None = None

    # -- wiring ---------------------------------------------------------------------------
    def attach(self, publisher: LogPublisher = globalLogPublisher) -> ServerMetrics:
        """Start observing the factory's hook runner, lookups and log events."""
        self.factory.runner.observer = self.observe_hook
        self.factory.peer_info.observer = self.observe_lookup
        self.factory.metrics = self  # type: ignore[attr-defined]
        publisher.addObserver(self)
        self._publisher = publisher
        return self

    def detach(self) -> None:
        """Stop observing (the figures stay readable)."""
        if self._publisher is not None:
            self._publisher.removeObserver(self)
            self._publisher = None
        if self.factory.runner.observer == self.observe_hook:
            self.factory.runner.observer = None
        self.factory.peer_info.observer = None

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    # -- observers ------------------------------------------------------------------------
    def observe_hook(self, hook: str, plugin: str, seconds: float, outcome: HookOutcome) -> None:
        self.hook_seconds.labels(hook, plugin).observe(seconds)
        result = "error" if outcome.error else outcome.result.name
        self.hook_results.labels(hook, plugin, result).inc()

    def session_changed(self, opened: bool) -> None:
        """A session started (True) or ended (False): counted here in multiprocess mode."""
        if not self.multiprocess:
            return
        if opened:
            self.connections.inc()
            self.connections_open.inc()
        else:
            self.connections_open.dec()

    def observe_lookup(self, kind: str, seconds: float, outcome: str) -> None:
        self.lookup_seconds.labels(kind).observe(seconds)
        self.lookups.labels(kind, outcome).inc()

    def __call__(self, event: dict[str, Any]) -> None:
        """A log event: count it if it is one of this factory's sessions' summaries."""
        kind = event.get("event")
        if kind is None:
            return
        source = event.get("log_source")
        if source is not self.factory and getattr(source, "factory", None) is not self.factory:
            return
        code = event.get("code")
        if kind == "transaction":
            hook = str(event.get("hook") or "queue")
            self.transactions.labels(str(event.get("result")), hook, reply_class(code)).inc()
            self.bytes_received.inc(int(event.get("size") or 0))
            self.recipients.inc(int(event.get("recipients") or 0))
            if hook in ("queue", "queue_pre"):
                outcome = {"2xx": "queued", "4xx": "deferred", "5xx": "refused"}
                plugin = event.get("plugin") or "-"
                self.queue.labels(plugin, outcome.get(reply_class(code), "other")).inc()
        elif kind == "rejection":
            self.rejections.labels(str(event.get("hook")), reply_class(code)).inc()
        elif kind == "milter":
            labels = (str(event.get("milter")), str(event.get("stage")), str(event.get("verdict")))
            self.milter_verdicts.labels(*labels).inc()
        elif kind == "connection_refused":
            self.connections_refused.labels(str(event.get("limit"))).inc()
        elif kind == "deadline":
            self.deadlines.labels(str(event.get("limit"))).inc()
        elif kind == "limit_refused":
            self.limit_refusals.labels(str(event.get("limit"))).inc()
        elif kind == "redis_outage":
            self.redis_outages.labels(str(event.get("plugin"))).inc()
        elif kind == "http_queue":
            self.http_queue.labels(str(event.get("plugin")), str(event.get("outcome"))).inc()
        elif kind == "plugin_outcome":
            self.plugin_outcomes.labels(str(event.get("plugin")), str(event.get("outcome"))).inc()


class _MetricsService(StreamServerEndpointService):
    """Collects while it runs: observers are attached on start and removed on stop, so a
    stopped server (or a finished test) leaves nothing behind in the log publisher."""

    metrics: ServerMetrics

    def startService(self) -> None:
        if self.metrics._publisher is None:
            self.metrics.attach()
        super().startService()

    def stopService(self) -> Any:
        self.metrics.detach()
        return super().stopService()


class MetricsResource(Resource):
    """``GET`` anything: the Prometheus text exposition (rendered in the reactor: cheap)."""

    isLeaf = True

    def __init__(self, metrics: ServerMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.exposition()


def metrics_service(
    endpoint: str, factory: SMTPFactory, parent: IServiceCollection | None = None
) -> StreamServerEndpointService:
    """A service serving ``factory``'s metrics over HTTP on the endpoint string.

    ``endpoint`` is a Twisted server endpoint string (``tcp:9125:interface=127.0.0.1``);
    a malformed one raises ValueError at once.
    """
    from twisted.internet import reactor

    metrics = getattr(factory, "metrics", None) or ServerMetrics(factory)
    site = Site(MetricsResource(metrics))
    site.noisy = False
    service = _MetricsService(serverFromString(reactor, endpoint), site)
    service.metrics = metrics
    fail_start_on_bind_error(service)  # a port in use stops the start
    service.setName("qpconn-metrics")
    if parent is not None:
        service.setServiceParent(parent)
    return service
