"""hosts_allow end to end: per-network rules and the per-address connection cap."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from tests.e2e_client import watch_errors
from tests.support.policy import BoundClient, codes, script, sessions_plugin
from tests.support.server import in_thread, write_config

RULES = [
    "127.0.0.5 allow",
    "127.0.0.0/30 deny",  # 127.0.0.0 - 127.0.0.3
    "127.0.0.6/31 denysoft Come back tomorrow",
    "127.0.0.8 DENY 5.7.0 Not from there",
]


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


def start(qpconn_server: Any, line: str = "hosts_allow") -> Any:
    recorder = sessions_plugin()
    server = qpconn_server(
        plugins=[line, "relay", "rcpt_ok", "queue/maildir maildir", recorder],
        files={"hosts_allow": RULES},
    )
    server.extra["sessions"] = recorder
    return server


@pytest.mark.parametrize(
    ("source", "code", "text"),
    [
        ("127.0.0.2", 550, "5.7.1 Connections from your address are not accepted"),
        ("127.0.0.6", 450, "4.7.1 Come back tomorrow"),
        ("127.0.0.7", 450, "4.7.1 Come back tomorrow"),
        ("127.0.0.8", 550, "5.7.0 Not from there"),
        ("127.0.0.5", 220, ""),
        ("127.0.0.9", 220, ""),
    ],
)
@pytest_twisted.ensureDeferred
async def test_rules_first_match_decides(qpconn_server, source, code, text):
    server = start(qpconn_server)
    replies = await in_thread(script, server.address, source, ["EHLO c.test"])
    assert replies[0].code == code and replies[0].text.startswith(text), replies
    assert len(replies) == (2 if code == 220 else 1)
    await server.wait_sessions_closed()
    (verdict,) = server.extra["sessions"].of("hosts_allow")
    assert verdict["result"] == ("pass" if code == 220 else "fail")


def hold(address: tuple[str, int], source: str, count: int) -> list[int]:
    """Open ``count`` sessions from ``source`` at once; the greeting codes, in order."""
    clients = []
    try:
        for _ in range(count):
            client = BoundClient(address, source)
            clients.append(client)
        return [client.greeting.code for client in clients]
    finally:
        for client in clients:
            client.close()


@pytest_twisted.ensureDeferred
async def test_connection_cap_per_address(qpconn_server):
    server = start(qpconn_server, "hosts_allow max_conn_per_ip 2")
    assert await in_thread(hold, server.address, "127.0.0.9", 4) == [220, 220, 450, 450]
    await server.wait_sessions_closed()
    # another address has its own count; an "allow" rule is exempt from the cap
    assert await in_thread(hold, server.address, "127.0.0.10", 2) == [220, 220]
    assert await in_thread(hold, server.address, "127.0.0.5", 4) == [220] * 4
    await server.wait_sessions_closed()
    # the refused sessions do not count: once the others close, the address gets in again
    assert await in_thread(hold, server.address, "127.0.0.9", 2) == [220, 220]
    await server.wait_sessions_closed()
    again = await in_thread(script, server.address, "127.0.0.9", [])
    assert again[0].code == 220
    await server.wait_sessions_closed()
    fails = [v for s in server.extra["sessions"].sessions for v in s if v["result"] == "fail"]
    assert len(fails) == 2 and fails[0]["reason"] == "3 sessions open, limit 2"


def test_bad_rules_stop_the_start(tmp_path):
    for lines in (["127.0.0.1"], ["127.0.0.300 allow"], ["127.0.0.1 maybe"]):
        config = Config(write_config(str(tmp_path), {"hosts_allow": lines}))
        with pytest.raises(PluginLoadError):
            load_plugin(config, "hosts_allow")
    with pytest.raises(PluginLoadError):
        load_plugin(Config(None), "hosts_allow", "max_conn_per_ip", "-1")


@pytest_twisted.ensureDeferred
async def test_greeting_text_closes(qpconn_server):
    server = start(qpconn_server)

    def closed() -> bool:
        with BoundClient(server.address, "127.0.0.2") as client:
            assert client.greeting.code == 550
            return client.is_closed()

    assert await in_thread(closed)
    assert codes(await in_thread(script, server.address, "127.0.0.1", [])) == [550]
