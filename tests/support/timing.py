"""Waiting in tests without guessing how long things take.

The rule (docs/testing.md, DESIGN.md): a test waits on an event or on a bounded poll for
the state it is about to assert, never a fixed sleep, and any bound on elapsed time keeps
only what the behaviour needs, with a margin a loaded machine cannot exhaust.

* :func:`wait_until` is the one bounded poll: call it from a thread (a blocking client, or
  ``await in_thread(wait_until, ...)`` from a reactor test, so the server keeps running
  while the test waits). Its timeout is a ceiling for a broken server, not a guess of how
  long a working one takes: it returns as soon as the predicate holds.
* :func:`timed_reply` and :func:`assert_data_timed_out` are the timeout tests' parts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.e2e_client import Client, Reply

#: how long :func:`wait_until` polls by default; only a failing test ever waits this long
WAIT_CEILING = 30.0


def wait_until(predicate: Callable[[], object], timeout: float = WAIT_CEILING) -> bool:
    """Poll ``predicate()`` every 20 ms until it is true or ``timeout`` seconds have passed.

    Returns whether it became true (its last value, asked once more at the deadline), so
    a test writes ``assert wait_until(lambda: ...)`` and fails with its own message.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


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


def assert_within_timeout(waited: float, fired: float, instead_of: float) -> None:
    """``waited`` seconds are those of a timeout of ``fired`` seconds, not of ``instead_of``.

    Below, a timeout cannot fire before it is due (a small tolerance for timer
    granularity). Above, the bound is half the next-larger alternative -- the timeout that
    would have answered had ours been ignored -- which no load on the machine reaches.
    """
    assert fired - 0.05 <= waited < instead_of / 2, (waited, fired, instead_of)


async def assert_data_timed_out(
    server: Any, outcome: tuple[Reply, float, bool], fired: float, instead_of: float
) -> None:
    """``421 4.4.2`` after a stall of ``fired`` seconds (see :func:`assert_within_timeout`),
    the connection closed, no message stored and no session left on the server."""
    reply, waited, closed = outcome
    assert (reply.code, reply.last.split()[0]) == (421, "4.4.2"), reply
    assert_within_timeout(waited, fired, instead_of)
    assert closed
    await server.wait_sessions_closed()
    assert server.messages() == []
    assert not server.factory.sessions
