"""OpenTelemetry traces of the sessions (``twistd qpconn --tracing``; the ``otel`` extra).

The only module of qpconn that imports OpenTelemetry. It implements the tracing interface of
:mod:`qpconn.hooks.tracing` (which spans exist, under which parent, with which attributes)
on OpenTelemetry's API, and builds a tracer provider the way OpenTelemetry's own tools do:
from the standard ``OTEL_*`` environment variables, so that an operator configures qpconn's
traces exactly as every other OpenTelemetry-instrumented service of theirs:

* ``OTEL_TRACES_EXPORTER``: exporters by name, comma-separated; ``otlp`` when unset (the
  OpenTelemetry specification's default), ``console`` (standard output), ``none``. ``otlp``
  speaks gRPC, or HTTP when ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` (or
  ``OTEL_EXPORTER_OTLP_PROTOCOL``) is ``http/protobuf``, as the Python SDK's own
  auto-configuration chooses. Exporters are found by their ``opentelemetry_traces_exporter``
  entry points: ``pip install opentelemetry-exporter-otlp`` adds both OTLP exporters.
* the exporters' own variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``..._HEADERS``, ...), the
  SDK's (``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, ``OTEL_SDK_DISABLED``) and the resource's
  (``OTEL_SERVICE_NAME``, default ``qpconn``; ``OTEL_RESOURCE_ATTRIBUTES``).

Spans are exported from the SDK's batch processor thread, never from the reactor. A tracer
provider already installed in the process (``opentelemetry-instrument twistd ...``, or a
``.tac`` file's own) is used as it is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from twisted.application.service import IServiceCollection, Service
from twisted.internet import threads

import qpconn
from qpconn.hooks.tracing import AttributeValue, Span

if TYPE_CHECKING:
    from qpconn.server.factory import SMTPFactory

__all__ = [
    "OTelSpan",
    "OTelTracer",
    "TracingError",
    "TracingService",
    "exporter_names",
    "provider_from_environment",
    "tracing_problems",
    "tracing_service",
]

#: the entry point group OpenTelemetry's span exporters register under
EXPORTER_GROUP = "opentelemetry_traces_exporter"
_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
#: an empty context: a session's span starts a trace of its own, whatever is current
_ROOT = otel_context.Context()


class TracingError(ValueError):
    """The environment asks for tracing that cannot be set up (an exporter not installed)."""


class OTelSpan:
    """An OpenTelemetry span behind qpconn's :class:`~qpconn.hooks.tracing.Span`."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        self.span.set_attributes(attributes)

    def add_event(self, name: str, attributes: Mapping[str, AttributeValue]) -> None:
        self.span.add_event(name, attributes)

    def record_exception(self, exception: BaseException) -> None:
        self.span.record_exception(exception)

    def set_error(self, description: str) -> None:
        self.span.set_status(Status(StatusCode.ERROR, description))

    def end(self) -> None:
        self.span.end()


class OTelTracer:
    """qpconn's :class:`~qpconn.hooks.tracing.Tracer` on an OpenTelemetry tracer provider."""

    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        self.provider = provider if provider is not None else trace.get_tracer_provider()
        self._tracer = self.provider.get_tracer("qpconn", qpconn.__version__)

    def start_span(
        self, name: str, parent: Span | None, attributes: Mapping[str, AttributeValue]
    ) -> OTelSpan:
        # a parent is always one of ours: spans come from this tracer only
        where = _ROOT if parent is None else trace.set_span_in_context(cast(OTelSpan, parent).span)
        return OTelSpan(self._tracer.start_span(name, context=where, attributes=attributes))


# -- the provider, from the environment ---------------------------------------------------
def exporter_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The entry point names of the exporters ``OTEL_TRACES_EXPORTER`` asks for.

    ``otlp`` becomes ``otlp_proto_grpc`` or ``otlp_proto_http`` by the OTLP protocol
    variables; ``none`` (alone) is no exporter. ValueError for a protocol not known.
    """
    names = [name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    names = [name for name in names if name and name != "none"]
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    chosen = []
    for name in names:
        if name == "otlp":
            if protocol not in _OTLP_BY_PROTOCOL:
                raise ValueError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r}: grpc or http/protobuf"
                )
            name = _OTLP_BY_PROTOCOL[protocol]
        chosen.append(name)
    return chosen


def _exporter_class(name: str) -> Any:
    found = entry_points(group=EXPORTER_GROUP, name=name)
    if not found:
        package = "opentelemetry-exporter-otlp" if name.startswith("otlp") else "its package"
        raise TracingError(
            f"OTEL_TRACES_EXPORTER asks for the span exporter {name!r}, which is not "
            f"installed (pip install {package})"
        )
    return next(iter(found)).load()


def tracing_problems(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Why ``--tracing`` cannot work here (none: it can); nothing is built or started."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        try:
            for name in exporter_names(environ):
                _exporter_class(name)
        except (ValueError, TracingError) as exc:
            return [str(exc)]
    return []


def provider_from_environment(environ: Mapping[str, str] = os.environ) -> trace.TracerProvider:
    """The process's tracer provider: the one installed already, else one built from the
    ``OTEL_*`` variables (its exporters behind batch processors) and installed globally, so
    that a plugin's own OpenTelemetry spans (or an instrumented library's) go the same way.
    """
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        return current
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    try:
        classes = [_exporter_class(name) for name in exporter_names(environ)]
    except ValueError as exc:
        raise TracingError(str(exc)) from exc
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "qpconn"}))
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
    for exporter in classes:  # each reads its own OTEL_EXPORTER_* variables
        provider.add_span_processor(BatchSpanProcessor(exporter()))
    trace.set_tracer_provider(provider)
    return provider


# -- the service ------------------------------------------------------------------------
class TracingService(Service):
    """While running, the factory's sessions are traced.

    Stopping stops tracing new sessions and flushes what is pending (in a thread: an
    exporter may wait on the network). Sessions still open finish their spans; the SDK's
    provider flushes those at exit.
    """

    def __init__(self, factory: SMTPFactory, tracer: OTelTracer) -> None:
        self.factory = factory
        self.tracer = tracer
        self.setName("qpconn-tracing")

    def startService(self) -> None:
        super().startService()
        self.factory.tracer = self.tracer

    def stopService(self) -> Any:
        super().stopService()
        if self.factory.tracer is self.tracer:
            self.factory.tracer = None
        flush = getattr(self.tracer.provider, "force_flush", None)
        return threads.deferToThread(flush) if flush is not None else None


def tracing_service(
    factory: SMTPFactory,
    parent: IServiceCollection | None = None,
    provider: trace.TracerProvider | None = None,
) -> TracingService:
    """A service that traces ``factory``'s sessions while it runs.

    ``provider``: an OpenTelemetry tracer provider (a test's, with an in-memory exporter);
    by default :func:`provider_from_environment`. TracingError when the environment names
    an exporter that is not installed.
    """
    tracer = OTelTracer(provider if provider is not None else provider_from_environment())
    service = TracingService(factory, tracer)
    if parent is not None:
        service.setServiceParent(parent)
    return service
