"""OpenTelemetry traces of real sessions (``--tracing``, qpconn.app.tracing, qpconn.hooks.tracing).

The server listens on loopback and smtplib talks to it; spans go to the OpenTelemetry SDK's
in-memory exporter. Pins: one span per session, per transaction (from its MAIL to its end)
and per plugin call of a hook, nested (hook runs under their transaction or session, every
transaction under its session, one trace per session); their attributes (client address,
helo, queue id, plugin, hook, result, latency); a failing plugin's span has an error status
and the exception; without tracing there are no spans and OpenTelemetry is never imported.
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
from twisted.internet import defer, task

from qpconn import DECLINED
from qpconn.plugins import Plugin
from tests.support.process import free_port
from tests.support.server import in_thread

pytest.importorskip(
    "opentelemetry.sdk", reason="OpenTelemetry SDK not installed (pip install 'qpconn[otel]')"
)

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

from qpconn.app.tracing import exporter_names, tracing_service

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Watcher(Plugin):
    """Declines at a session hook (ehlo, disconnect) and a transaction hook (mail)."""

    def hook_ehlo(self, transaction, host):
        return DECLINED

    def hook_mail(self, transaction, sender, params):
        return DECLINED

    def hook_disconnect(self, transaction):
        return DECLINED


class Boom(Plugin):
    """Fails at MAIL: the command gets 451 and the span says why."""

    def hook_mail(self, transaction, sender, params):
        raise RuntimeError("the policy database is gone")


class Stuck(Plugin):
    """Never answers RCPT: its timeout makes it fail."""

    timeout = 0.2

    def hook_rcpt(self, transaction, recipient, params):
        return defer.Deferred()


@pytest.fixture
def exporter():
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter):
    provider = TracerProvider()  # not the global one: each test sees its own spans
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def traced_server(qpconn_server, provider, plugins):
    server = qpconn_server(plugins=plugins)
    service = tracing_service(server.factory, provider=provider)
    service.startService()
    return server, service


async def finished(server, service):
    await server.wait_sessions_closed()
    await service.stopService()


async def spans_when_ended(exporter, count, timeout=10.0):
    """The finished spans, once there are at least ``count`` (bounded poll)."""
    from twisted.internet import reactor

    for _ in range(int(timeout / 0.02)):
        spans = exporter.get_finished_spans()
        if len(spans) >= count:
            return list(spans)
        await task.deferLater(reactor, 0.02, lambda: None)
    return list(exporter.get_finished_spans())


def by_name(spans, name):
    return [span for span in spans if span.name == name]


def two_transactions(address):
    with smtplib.SMTP(*address, timeout=10) as smtp:
        smtp.ehlo("client.test")
        port = smtp.sock.getsockname()[1]
        smtp.mail("a@example.org")
        assert smtp.rcpt("u@localhost")[0] == 250
        refused = smtp.rcpt("someone@elsewhere.example")
        first = smtp.data(b"Subject: one\r\n\r\nfirst\r\n")
        smtp.mail("b@example.org")
        smtp.rcpt("v@localhost")
        second = smtp.data(b"Subject: two\r\n\r\nsecond\r\n")
    return port, refused, first, second


@pytest_twisted.ensureDeferred
async def test_session_transactions_and_hook_runs_are_nested_spans(
    qpconn_server, provider, exporter
):
    plugins = [Watcher, "relay", "rcpt_ok", "queue/maildir ./maildir"]
    server, service = traced_server(qpconn_server, provider, plugins)
    port, refused, first, second = await in_thread(two_transactions, server.address)
    await finished(server, service)
    assert refused == (550, b"5.7.1 Relaying denied")
    assert first[0] == second[0] == 250
    spans = await spans_when_ended(exporter, 1)

    (session,) = by_name(spans, "smtp session")
    assert session.parent is None
    assert session.attributes["client.address"] == "127.0.0.1"
    assert session.attributes["client.port"] == port
    assert session.attributes["qpconn.helo"] == "client.test"
    assert session.attributes["qpconn.hello"] == "ehlo"
    assert session.attributes["qpconn.transactions"] == 2
    conn_id = session.attributes["qpconn.conn_id"]
    assert all(span.context.trace_id == session.context.trace_id for span in spans)

    transactions = sorted(by_name(spans, "smtp transaction"), key=lambda s: s.start_time)
    assert [t.parent.span_id for t in transactions] == [session.context.span_id] * 2
    queue_ids = [t.attributes["qpconn.queue_id"] for t in transactions]
    # the queue id of each span is the one the client was given
    assert [first[1].decode(), second[1].decode()] == [f"2.0.0 Queued as {q}" for q in queue_ids]
    assert all(q.startswith(conn_id + ".") for q in queue_ids)
    for txn, recipients in zip(transactions, (1, 1), strict=True):
        assert txn.attributes["qpconn.result"] == "accepted"
        assert txn.attributes["qpconn.reply_code"] == 250
        assert txn.attributes["qpconn.hook"] == "queue"
        assert txn.attributes["qpconn.plugin"] == "queue/maildir"
        assert txn.attributes["qpconn.recipients"] == recipients
    (refusal,) = transactions[0].events
    assert refusal.name == "rcpt refused"
    assert refusal.attributes["qpconn.reply_code"] == 550
    assert not transactions[1].events

    def children(parent):
        return sorted(
            (s for s in spans if s.parent and s.parent.span_id == parent.context.span_id),
            key=lambda s: s.start_time,
        )

    session_hooks = [(s.name, s.attributes["qpconn.result"]) for s in children(session)
                     if s.name != "smtp transaction"]  # fmt: skip
    assert session_hooks == [
        ("connect relay", "DECLINED"),
        ("ehlo Watcher", "DECLINED"),
        ("disconnect Watcher", "DECLINED"),
    ]
    first_hooks = [(s.name, s.attributes["qpconn.result"]) for s in children(transactions[0])]
    assert first_hooks == [
        ("mail Watcher", "DECLINED"),
        ("rcpt rcpt_ok", "OK"),
        ("rcpt rcpt_ok", "DENY"),
        ("queue queue/maildir", "OK"),
    ]
    assert [s.name for s in children(transactions[1])] == [
        "mail Watcher", "rcpt rcpt_ok", "queue queue/maildir"
    ]  # fmt: skip
    for hook_span in children(transactions[0]):
        hook, plugin = hook_span.name.split(" ")
        assert hook_span.attributes["qpconn.hook"] == hook
        assert hook_span.attributes["qpconn.plugin"] == plugin
        latency = hook_span.attributes["qpconn.latency"]
        assert 0 <= latency <= (hook_span.end_time - hook_span.start_time) / 1e9
        assert hook_span.status.status_code is StatusCode.UNSET
    # every span has ended, inside its parent's time
    by_id = {s.context.span_id: s for s in spans}
    for span in spans:
        if span.parent is not None:
            parent = by_id[span.parent.span_id]
            assert parent.start_time <= span.start_time <= span.end_time <= parent.end_time


def failing_session(address):
    with smtplib.SMTP(*address, timeout=10) as smtp:
        smtp.ehlo("client.test")
        mail = smtp.docmd("MAIL FROM:<a@example.org>")
        smtp.rset()
    return mail


@pytest_twisted.ensureDeferred
async def test_a_failing_plugin_has_an_error_span_with_its_exception(
    qpconn_server, provider, exporter
):
    server, service = traced_server(qpconn_server, provider, [Boom, "rcpt_ok", "queue/discard"])
    mail = await in_thread(failing_session, server.address)
    await finished(server, service)
    assert mail[0] == 451
    spans = await spans_when_ended(exporter, 1)
    (hook_span,) = by_name(spans, "mail Boom")
    assert hook_span.status.status_code is StatusCode.ERROR
    assert hook_span.attributes["qpconn.result"] == "error"
    (event,) = hook_span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "RuntimeError"
    assert event.attributes["exception.message"] == "the policy database is gone"
    (txn,) = by_name(spans, "smtp transaction")
    assert hook_span.parent.span_id == txn.context.span_id
    # no verdict at DATA: the span says how the transaction ended instead
    assert txn.attributes["qpconn.result"] == "reset"
    (session,) = by_name(spans, "smtp session")
    assert session.status.status_code is StatusCode.UNSET  # the session itself went on


def stuck_session(address):
    with smtplib.SMTP(*address, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("a@example.org")
        return smtp.rcpt("u@localhost")


@pytest_twisted.ensureDeferred
async def test_a_plugin_that_overruns_its_timeout_has_an_error_span(
    qpconn_server, provider, exporter
):
    server, service = traced_server(qpconn_server, provider, [Stuck, "rcpt_ok", "queue/discard"])
    rcpt = await in_thread(stuck_session, server.address)
    await finished(server, service)
    assert rcpt[0] == 451
    spans = await spans_when_ended(exporter, 1)
    (hook_span,) = by_name(spans, "rcpt Stuck")
    assert hook_span.status.status_code is StatusCode.ERROR
    assert hook_span.attributes["qpconn.latency"] >= 0.2
    assert hook_span.events[0].attributes["exception.type"].endswith("TimeoutError")
    (txn,) = by_name(spans, "smtp transaction")
    assert txn.attributes["qpconn.result"] == "disconnect"  # QUIT inside the transaction


def one_message(address):
    with smtplib.SMTP(*address, timeout=10) as smtp:
        smtp.sendmail("a@example.org", ["u@localhost"], b"Subject: x\r\n\r\nx\r\n")


@pytest_twisted.ensureDeferred
async def test_no_spans_without_tracing_or_once_it_stops(qpconn_server, provider, exporter):
    server = qpconn_server(plugins=["rcpt_ok", "queue/discard"])
    await in_thread(one_message, server.address)
    await server.wait_sessions_closed()
    assert server.factory.tracer is None
    assert exporter.get_finished_spans() == ()
    # on, then off again: only the session in between is traced
    service = tracing_service(server.factory, provider=provider)
    service.startService()
    await in_thread(one_message, server.address)
    await server.wait_sessions_closed()
    await service.stopService()
    await in_thread(one_message, server.address)
    await server.wait_sessions_closed()
    assert server.factory.tracer is None
    assert len(by_name(exporter.get_finished_spans(), "smtp session")) == 1


def test_exporter_names_follow_the_opentelemetry_variables():
    assert exporter_names({}) == ["otlp_proto_grpc"]  # the specification's default, otlp
    http = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert exporter_names({"OTEL_TRACES_EXPORTER": "otlp", **http}) == ["otlp_proto_http"]
    assert exporter_names(
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc", **http}
    ) == ["otlp_proto_grpc"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "console, otlp"}) == [
        "console", "otlp_proto_grpc"
    ]  # fmt: skip
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    with pytest.raises(ValueError, match="grpc or http/protobuf"):
        exporter_names({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_tracing_with_an_exporter_not_installed_is_a_usage_error(monkeypatch):
    from twisted.python import usage

    from qpconn.app.options import Options

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "no_such_exporter")
    with pytest.raises(usage.UsageError, match="'no_such_exporter', which is not installed"):
        Options().parseOptions(["--tracing"])


# -- the whole process, as twistd builds it ------------------------------------------------
SERVE_ONE_MESSAGE = textwrap.dedent(
    """
    import json, smtplib, sys, threading
    from twisted.internet import reactor
    from qpconn.app.options import Options, makeService

    port, config, *flags = sys.argv[1:]
    options = Options()
    options.parseOptions(["--listen", f"tcp:{port}:interface=127.0.0.1", "--config", config,
                          *flags])
    top = makeService(options)
    result = {}

    def client():
        try:
            with smtplib.SMTP("127.0.0.1", int(port), timeout=10) as smtp:
                smtp.ehlo("client.test")
                smtp.mail("a@example.org")
                smtp.rcpt("u@localhost")
                result["data"] = smtp.data(b"Subject: x\\r\\n\\r\\nx\\r\\n")[1].decode()
        finally:
            reactor.callFromThread(stop)

    def stop():
        def closed():
            if top.factory.sessions:
                reactor.callLater(0.02, closed)  # the disconnect hooks first
            else:
                top.stopService().addBoth(lambda _: reactor.stop())
        closed()

    top.startService()
    reactor.callWhenRunning(threading.Thread(target=client).start)
    reactor.callLater(30, reactor.stop)  # bounded, whatever happens
    reactor.run()
    result["otel"] = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
    print("RESULT " + json.dumps(result), flush=True)
    """
)


def serve_one_message(tmp_path, *flags, env=None):
    config = tmp_path / "config"
    config.mkdir()
    (config / "me").write_text("mx.test\n")
    (config / "plugins").write_text("rcpt_ok\nqueue/discard\n")
    completed = subprocess.run(
        [sys.executable, "-c", SERVE_ONE_MESSAGE, str(free_port()), str(config), *flags],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": REPOSITORY, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    (result,) = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
    return result, completed.stdout


def test_without_tracing_opentelemetry_is_never_imported(tmp_path):
    result, _ = serve_one_message(tmp_path)
    assert result["data"].startswith("2.0.0 Queued as ")
    assert result["otel"] == []


def test_tracing_flag_exports_as_the_environment_says(tmp_path):
    """The control of the test above, and the path an operator takes: ``--tracing`` with
    ``OTEL_TRACES_EXPORTER=console`` prints the spans (the SDK's JSON) on standard output."""
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "mx-test"}
    result, stdout = serve_one_message(tmp_path, "--tracing", env=env)
    assert "opentelemetry.sdk.trace" in result["otel"]
    queue_id = result["data"].split()[3]  # 2.0.0 Queued as ID (discarded)
    assert f'"qpconn.queue_id": "{queue_id}"' in stdout
    assert '"name": "smtp session"' in stdout
    assert '"name": "queue queue/discard"' in stdout
    assert '"service.name": "mx-test"' in stdout


class _Collector:
    """An OTLP/HTTP receiver on loopback: keeps each POSTed ExportTraceServiceRequest."""

    def __init__(self):
        import http.server
        import threading

        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                requests.append((self.path, self.headers["Content-Type"], body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_tracing_exports_over_otlp_http_to_a_collector(tmp_path):
    """docs/running.md's OTLP set-up, over HTTP: the spans reach a collector on loopback."""
    pytest.importorskip(
        "opentelemetry.exporter.otlp.proto.http",
        reason="the OTLP/HTTP exporter is not installed (pip install "
        "opentelemetry-exporter-otlp-proto-http)",
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    collector = _Collector()
    try:
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        }
        result, _ = serve_one_message(tmp_path, "--tracing", env=env)
    finally:
        collector.close()
    assert collector.requests, "no export reached the collector"
    spans = {}
    for path, content_type, body in collector.requests:
        assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert service["service.name"] == "qpconn"
            for scope_spans in resource_spans.scope_spans:
                assert scope_spans.scope.name == "qpconn"
                for span in scope_spans.spans:
                    spans[span.span_id] = span
    names = sorted(span.name for span in spans.values())
    assert names == ["queue queue/discard", "rcpt rcpt_ok", "smtp session", "smtp transaction"]
    (txn,) = [s for s in spans.values() if s.name == "smtp transaction"]
    attributes = {a.key: a.value for a in txn.attributes}
    assert attributes["qpconn.queue_id"].string_value == result["data"].split()[3]
    (session,) = [s for s in spans.values() if s.name == "smtp session"]
    assert txn.parent_span_id == session.span_id
    assert all(s.trace_id == session.trace_id for s in spans.values())
