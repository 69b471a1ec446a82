"""Timeout tests' shared parts: how long the server took to answer, and what a session
ended by a timeout must leave behind (nothing)."""

from __future__ import annotations

import time
from typing import Any

from tests.e2e_client import Client, Reply


def timed_reply(smtp: Client, timeout: float | None = None) -> tuple[Reply, float, bool]:
    """The next reply, the seconds it took, and whether the server closed the connection.

    ``timeout`` (when given) bounds the client's wait, so a server that never answers
    fails the test instead of hanging it.
    """
    started = time.monotonic()
    if timeout is not None:
        smtp.timeout = timeout
    reply = smtp.reply()
    return reply, time.monotonic() - started, smtp.is_closed()


async def assert_data_timed_out(server: Any, outcome: tuple[Reply, float, bool]) -> None:
    """``421 4.4.2`` within 0.2-2 s of a stall, the connection closed, no message stored
    and no session left on the server."""
    reply, waited, closed = outcome
    assert (reply.code, reply.last.split()[0]) == (421, "4.4.2"), reply
    assert 0.2 < waited < 2.0, waited
    assert closed
    await server.wait_sessions_closed()
    assert server.messages() == []
    assert not server.factory.sessions
