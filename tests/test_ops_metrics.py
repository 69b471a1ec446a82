"""--metrics: Prometheus figures scraped over HTTP while real SMTP sessions run."""

from __future__ import annotations

import ipaddress
import smtplib
import socket
import subprocess
import urllib.request
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from qpconn.app.metrics import metrics_service
from qpconn.server.peerinfo import LookupSettings, clear_shared_cache
from tests.support.dnsserver import start_dns_server
from tests.support.identserver import start_ident_server
from tests.support.process import free_port, running, twistd_command
from tests.support.server import in_thread

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of the exposition at ``url``, by (name, labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def start_metrics(server: Any) -> tuple[str, Any]:
    service = metrics_service("tcp:0:interface=127.0.0.1", server.factory)
    service.startService()
    port = service._waitingForPort.result.getHost().port
    return f"http://127.0.0.1:{port}/metrics", service


@pytest_twisted.ensureDeferred
async def test_scrape_during_and_after_a_session_counts_what_happened(qpconn_server):
    server = qpconn_server()
    url, service = start_metrics(server)
    message = b"Subject: metrics\r\n\r\nsome text\r\n"

    def client() -> tuple[Samples, Samples]:
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            smtp.ehlo("client.test")
            during = scrape(url)
            smtp.mail("a@example.org")
            assert smtp.rcpt("u@mx.test")[0] == 250
            assert smtp.rcpt("v@mx.test")[0] == 250
            assert smtp.rcpt("x@elsewhere.example")[0] == 550
            assert smtp.data(message)[0] == 250
        return during, scrape(url)

    during, _ = await in_thread(client)
    await server.wait_sessions_closed()
    after = await in_thread(scrape, url)
    assert server.factory.runner.observer is not None
    await service.stopService()
    # a stopped metrics service leaves no observer behind
    assert server.factory.runner.observer is None
    assert server.factory.peer_info.observer is None

    assert value(during, "qpconn_connections_open") == 1
    assert value(during, "qpconn_connections_total") == 1
    assert value(after, "qpconn_connections_open") == 0
    assert value(after, "qpconn_connections_total") == 1
    accepted = {"result": "accepted", "hook": "queue", "reply_class": "2xx"}
    assert value(during, "qpconn_transactions_total", **accepted) == 0
    assert value(after, "qpconn_transactions_total", **accepted) == 1
    assert value(after, "qpconn_rejections_total", hook="rcpt", reply_class="5xx") == 1
    # the server stores the text with CRLF line ends and our Received field is not counted
    assert value(after, "qpconn_received_bytes_total") == len(message)
    assert value(after, "qpconn_recipients_total") == 2
    queued = {"plugin": "queue/maildir", "outcome": "queued"}
    assert value(after, "qpconn_queue_outcomes_total", **queued) == 1
    rcpt_ok = {"hook": "rcpt", "plugin": "rcpt_ok"}
    assert value(after, "qpconn_hook_duration_seconds_count", **rcpt_ok) == 3
    assert value(after, "qpconn_hook_duration_seconds_sum", **rcpt_ok) > 0
    assert value(after, "qpconn_hook_results_total", result="OK", **rcpt_ok) == 2
    assert value(after, "qpconn_hook_results_total", result="DENY", **rcpt_ok) == 1


@pytest_twisted.ensureDeferred
async def test_rejections_at_data_post_and_queue_are_counted_by_hook_and_class(qpconn_server):
    from qpconn import DENY, DENYSOFT
    from qpconn.plugins import Plugin

    class Judge(Plugin):
        def hook_data_post(self, transaction):
            if b"spam" in b"".join(transaction.body_chunks()):
                return DENY, "5.7.1 no spam"
            return None

        def hook_queue(self, transaction):
            return DENYSOFT, "4.3.0 disk full"

    server = qpconn_server(plugins=[Judge, "rcpt_ok"])
    url, service = start_metrics(server)

    def client() -> list[int]:
        codes = []
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            smtp.ehlo("client.test")
            for text in (b"spam\r\n", b"ham\r\n"):
                smtp.mail("a@example.org")
                smtp.rcpt("u@mx.test")
                codes.append(smtp.data(b"Subject: s\r\n\r\n" + text)[0])
        return codes

    assert await in_thread(client) == [552, 452]
    await server.wait_sessions_closed()
    after = await in_thread(scrape, url)
    await service.stopService()
    labels = {"result": "rejected", "hook": "data_post", "reply_class": "5xx"}
    assert value(after, "qpconn_transactions_total", **labels) == 1
    labels = {"result": "rejected", "hook": "queue", "reply_class": "4xx"}
    assert value(after, "qpconn_transactions_total", **labels) == 1
    assert value(after, "qpconn_queue_outcomes_total", plugin="Judge", outcome="deferred") == 1


def rev(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


def connect_from(address: tuple[str, int], source: str) -> int:
    """Connect from ``source``, read the greeting, QUIT; the greeting's code."""
    with socket.create_connection(address, timeout=10, source_address=(source, 0)) as sock:
        code = int(sock.recv(1024)[:3])
        sock.sendall(b"QUIT\r\n")
        sock.recv(1024)
    return code


@pytest_twisted.ensureDeferred
async def test_lookup_latency_and_timeouts_are_measured(qpconn_server):
    clear_shared_cache()
    # The ident service must listen on the client's address: clients come from 127.0.0.1.
    peer = "127.0.0.1"
    dns = start_dns_server({rev(peer): [("PTR", "good.test.")], "good.test": [("A", peer)]})
    hanging_dns = start_dns_server({}, hang={rev(peer)})
    ident = start_ident_server("user", user="alice")
    hanging_ident = start_ident_server("hang")
    try:
        urls, services = [], []
        # generous timeouts where answers come, short ones where they never do
        setups = ((dns, ident, 10.0), (hanging_dns, hanging_ident, 0.3))
        for dns_server, ident_server, timeout in setups:
            lookups = LookupSettings(
                dns_servers=[dns_server.address],
                dns_timeout=timeout,
                ident=True,
                ident_port=ident_server.port,
                ident_timeout=timeout,
            )
            server = qpconn_server(lookups=lookups)
            url, service = start_metrics(server)
            urls.append(url)
            services.append(service)
            assert await in_thread(connect_from, server.address, peer) == 220
            await server.wait_sessions_closed()
        fast = await in_thread(scrape, urls[0])
        late = await in_thread(scrape, urls[1])
        for service in services:
            await service.stopService()
    finally:
        for peer_server in (dns, hanging_dns, ident, hanging_ident):
            await peer_server.stop()
        clear_shared_cache()
    assert value(fast, "qpconn_lookups_total", kind="rdns", outcome="ok") == 1
    assert value(fast, "qpconn_lookups_total", kind="ident", outcome="ok") == 1
    assert value(fast, "qpconn_lookup_duration_seconds_count", kind="rdns") == 1
    assert 0 < value(fast, "qpconn_lookup_duration_seconds_sum", kind="rdns") < 10
    assert value(late, "qpconn_lookups_total", kind="rdns", outcome="timeout") == 1
    assert value(late, "qpconn_lookups_total", kind="ident", outcome="timeout") == 1
    assert value(late, "qpconn_lookup_duration_seconds_sum", kind="ident") >= 0.3
    # each server counts its own sessions only
    assert value(fast, "qpconn_lookups_total", kind="rdns", outcome="timeout") == 0


def test_twistd_metrics_option_serves_figures_of_a_live_session(tmp_path):
    port, metrics_port = free_port(), free_port()
    command = twistd_command(
        "qpconn",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--metrics",
        f"tcp:{metrics_port}:interface=127.0.0.1",
        "--no-rdns",
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with running(command, port, str(tmp_path)), smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.sendmail("a@example.org", ["u@localhost"], b"Subject: m\r\n\r\nhello\r\n")
        during = scrape(url)
    assert value(during, "qpconn_connections_open") == 1
    assert value(during, "qpconn_recipients_total") == 1
    accepted = {"result": "accepted", "hook": "queue", "reply_class": "2xx"}
    assert value(during, "qpconn_transactions_total", **accepted) == 1


def test_twistd_refuses_a_malformed_metrics_endpoint(tmp_path):
    result = subprocess.run(
        twistd_command("qpconn", "--metrics", "nonsense:1", "--listen", "tcp:0"),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert b"nonsense" in output
    assert b"Traceback" not in output
