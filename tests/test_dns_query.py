"""qpconn.kit.dns.query against a real loopback DNS server."""

import pytest_twisted
from twisted.internet import reactor

from qpconn.kit.dns import query
from qpconn.server.lookup import make_resolver
from tests.support.dnsserver import start_dns_server


@pytest_twisted.ensureDeferred
async def test_query_kinds():
    srv = start_dns_server({"a.test": [("A", "127.0.0.2")], "a6.test": [("AAAA", "::1")],
        "mx.test": [("MX", (10, "mail.test."))], "t.test": [("TXT", "v=spf1 -all")]},
        servfail={"bad.test"}, hang={"slow.test"})
    r = make_resolver([srv.address], 0.5)
    try:
        assert (await query(r, "a.test", "A", reactor, 1)).values == ["127.0.0.2"]
        assert (await query(r, "a6.test", "AAAA", reactor, 1)).values == ["::1"]
        assert (await query(r, "mx.test", "MX", reactor, 1)).values == [(10, "mail.test")]
        assert (await query(r, "t.test", "TXT", reactor, 1)).values == ["v=spf1 -all"]
        assert (await query(r, "t.test", "A", reactor, 1)).status == "nodata"
        assert (await query(r, "none.test", "A", reactor, 1)).status == "nxdomain"
        assert (await query(r, "bad.test", "A", reactor, 1)).status == "servfail"
        assert (await query(r, "slow.test", "A", reactor, 0.3)).status == "timeout"
    finally:
        await srv.stop()
