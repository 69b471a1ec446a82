"""Authenticated users are not judged by the checks meant for strangers.

A user submitting mail from a dynamic address listed in a block list (as most home and
mobile addresses are) authenticates with AUTH; from then on dnsbl, rhsbl,
resolvable_fromhost, headers and naughty leave the session alone, while the same client
without AUTH is refused. Real auth/flat_file, real loopback DNS, real qpconn.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.plugins.auth.flat_file import hash_password
from tests.e2e_client import watch_errors
from tests.support.dnsserver import DNSTestServer, start_dns_server
from tests.support.policy import codes, lookups, script
from tests.support.server import in_thread

ZONE: dict[str, list[tuple[Any, ...]]] = {
    "2.0.0.127.bl.test": [("A", "127.0.0.2")],
    "spam.test.dbl.test": [("A", "127.0.0.2")],
    "spam.test": [("MX", (0, "."))],  # null MX: resolvable_fromhost refuses it too
    "good.test": [("MX", (10, "mx.good.test."))],
}
PLAIN = base64.b64encode(b"\0alice\0secret").decode("ascii")
#: no Date: headers refuses it from a stranger
TEXT = b"From: alice@spam.test\r\nSubject: from the road\r\n\r\nhello\r\n"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest_twisted.async_yield_fixture
async def dns() -> AsyncIterator[DNSTestServer]:
    srv = start_dns_server(ZONE)
    yield srv
    await srv.stop()


@pytest.mark.parametrize("mark", ["1", "naughty"])
@pytest_twisted.ensureDeferred
async def test_authenticated_users_pass_strangers_are_refused(qpconn_server, dns, mark):
    server = qpconn_server(
        plugins=["auth/flat_file", f"dnsbl reject {mark}", "naughty", "rhsbl",
                 "resolvable_fromhost", "headers", "rcpt_ok", "queue/maildir maildir"],
        lookups=lookups(dns),
        files={"dnsbl_zones": ["bl.test"], "rhsbl_zones": ["dbl.test"], "tls_before_auth": "0",
               "flat_auth_pw": [f"alice:{hash_password('secret', log2n=4)}"]},
    )  # fmt: skip
    session = ["EHLO road.test", "MAIL FROM:<alice@spam.test>", "RCPT TO:<bob@elsewhere.test>",
               "DATA", TEXT]  # fmt: skip
    authenticated = [session[0], f"AUTH PLAIN {PLAIN}", *session[1:]]
    replies = await in_thread(script, server.address, "127.0.0.2", authenticated)
    assert codes(replies) == [220, 250, 235, 250, 250, 354, 250]
    assert len(server.messages()) == 1
    replies = await in_thread(script, server.address, "127.0.0.2", session)
    assert codes(replies)[:3] == [220, 250, 550]
    assert replies[2].text.startswith("5.7.1 Mail from spam.test is not accepted")
    replies = await in_thread(
        script, server.address, "127.0.0.2", [session[0], "MAIL FROM:<x@good.test>", session[2]]
    )
    assert codes(replies) == [220, 250, 250, 550]
    assert replies[3].text.startswith("5.7.1 Your address 127.0.0.2 is listed in bl.test")
