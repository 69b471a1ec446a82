"""Next hops named by host name are resolved through ``--dns-server`` when it is given.

The test's own DNS server (tests/support/dnsserver.py) is the only one that knows
``nexthop.test``: a message reaching the aiosmtpd next hop through a
``queue/smtp-forward nexthop.test PORT`` line proves which resolver was asked, and the
DNS server's query log says so too. An HTTP endpoint (``queue/http``) likewise.
"""

from __future__ import annotations

import smtplib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

import pytest
import pytest_twisted
from aiosmtpd.controller import Controller
from twisted.internet import reactor

from qpconn.client.httppost import MessageProducer, post
from qpconn.client.names import DNSHostnames
from qpconn.client.pool import ConnectionPool, Destination
from qpconn.client.smtp import NextHopError
from qpconn.server.lookup import make_resolver
from qpconn.server.peerinfo import LookupSettings
from tests.support.dnsserver import start_dns_server
from tests.support.nexthop import Recorder, aiosmtpd_next_hop
from tests.support.process import free_port, ipv6_loopback
from tests.support.server import in_thread, start_server

ZONE: dict[str, list[tuple[Any, ...]]] = {
    "nexthop.test": [("A", "127.0.0.1")],
    "alias.test": [("CNAME", "nexthop.test.")],
    "v6hop.test": [("AAAA", "::1")],
}


@pytest_twisted.async_yield_fixture
async def dns():
    server = start_dns_server(ZONE, servfail={"broken.test"})
    yield server
    await server.stop()


def resolver_for(dns_server) -> Any:
    return make_resolver([dns_server.address], 5.0)


@pytest_twisted.ensureDeferred
async def test_a_pool_reaches_a_next_hop_only_the_servers_dns_knows(dns):
    with aiosmtpd_next_hop() as (hop, controller):
        for name in ("nexthop.test", "alias.test"):
            pool = ConnectionPool(Destination(host=name, port=controller.port), helo="mx.test",
                                  reactor=reactor, resolver=resolver_for(dns))  # fmt: skip
            client = await pool.acquire()
            pool.release(client)
            await pool.close()
        assert len(hop.hellos) == 2
    assert dns.count("nexthop.test", "A") >= 1 and dns.count("alias.test", "A") >= 1


@pytest_twisted.ensureDeferred
async def test_an_ipv6_only_name_and_names_that_do_not_resolve(dns):
    refused = []
    if ipv6_loopback():
        hop = Recorder()
        controller = Controller(hop, hostname="::1", port=free_port(), ready_timeout=10.0)
        controller.start()
        try:
            pool = ConnectionPool(Destination(host="v6hop.test", port=controller.port),
                                  helo="mx.test", reactor=reactor,
                                  resolver=resolver_for(dns))  # fmt: skip
            client = await pool.acquire()
            pool.release(client)
            await pool.close()
        finally:
            controller.stop()
        assert hop.hellos and hop.hellos[0][0] == "::1"
    for name in ("unknown.test", "broken.test"):
        pool = ConnectionPool(Destination(host=name, port=25), helo="mx.test", reactor=reactor,
                              resolver=resolver_for(dns), connect_timeout=10)  # fmt: skip
        with pytest.raises(NextHopError, match=f"cannot connect to {name}:25"):
            await pool.acquire()
        refused.append(name)
    assert refused == ["unknown.test", "broken.test"]


def test_ip_literals_are_not_looked_up():
    class NeverAsked:
        def lookupAddress(self, name):
            raise AssertionError("an IP literal was sent to DNS")

        lookupIPV6Address = lookupAddress

    found = []

    class Receiver:
        def resolutionBegan(self, resolution):
            pass

        def addressResolved(self, address):
            found.append((address.host, address.port))

        def resolutionComplete(self):
            found.append("done")

    DNSHostnames(NeverAsked()).resolveHostName(Receiver(), "127.0.0.1", 25)
    assert found == [("127.0.0.1", 25), "done"]


@pytest_twisted.ensureDeferred
async def test_the_running_server_forwards_to_a_named_next_hop_with_dns_server(tmp_path, dns):
    with aiosmtpd_next_hop() as (hop, controller):
        server = start_server(
            tmp_path,
            plugins=["rcpt_ok", f"queue/smtp-forward nexthop.test {controller.port}"],
            lookups=LookupSettings(rdns=False, dns_servers=[dns.address]),
        )
        try:
            def send() -> None:
                with smtplib.SMTP(*server.address, timeout=30) as smtp:
                    smtp.sendmail("a@example.org", ["user@mx.test"], "Subject: x\r\n\r\nbody\r\n")

            await in_thread(send)
        finally:
            await server.stop()
        assert len(hop.messages) == 1
    assert dns.count("nexthop.test", "A") >= 1


class _Accepting(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest_twisted.ensureDeferred
async def test_an_http_post_to_a_name_only_the_servers_dns_knows(dns):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Accepting)
    Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://nexthop.test:{httpd.server_address[1]}/mail".encode()
        chunks = [b"Subject: x\r\n\r\nbody\r\n"]
        body = MessageProducer(lambda: iter(chunks), len(chunks[0]))
        answer = await post(reactor, url, {}, body, 20.0, resolver_for(dns))
        assert answer.code == 204
    finally:
        await in_thread(httpd.shutdown)
        httpd.server_close()
    assert dns.count("nexthop.test", "A") >= 1
