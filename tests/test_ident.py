"""The RFC 1413 ident client against a real ident server on loopback."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from qpconn.server.ident import ident_lookup, parse_ident_reply, sanitize_userid
from tests.support.identserver import IdentTestServer, start_ident_server, unused_port
from tests.support.server import in_thread
from tests.support.timing import wait_until

TIMEOUT = 0.5
#: the timeout of the lookups that must end without one: an answer (or an error) in less
#: than half of it came from the server, not from the timer, however loaded the machine
LONG_TIMEOUT = 30.0
#: ident_lookup's own default: what would fire if the test's timeout were ignored
DEFAULT_TIMEOUT = 3.0
REMOTE_PORT, LOCAL_PORT = 6191, 25

ServerMaker = Callable[..., IdentTestServer]


@pytest_twisted.async_yield_fixture
async def ident_server() -> AsyncIterator[ServerMaker]:
    """Factory fixture: each test starts the server behaviour it needs."""
    started: list[IdentTestServer] = []

    def make(mode: str = "user", **kw: object) -> IdentTestServer:
        srv = start_ident_server(mode, **kw)  # type: ignore[arg-type]
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.stop()


def ask(srv_port: int, timeout: float = TIMEOUT) -> defer.Deferred[str | None]:
    return ident_lookup(
        reactor, "127.0.0.1", REMOTE_PORT, "127.0.0.1", LOCAL_PORT, port=srv_port, timeout=timeout
    )


@pytest_twisted.ensureDeferred
async def test_user_answered(ident_server: ServerMaker) -> None:
    srv = ident_server("user", user="alice")
    assert await ask(srv.port) == "alice"
    assert await in_thread(wait_until, lambda: srv.open_connections == 0)
    # The query names the peer's port first, then ours (RFC 1413).
    assert srv.requests == [b"6191 , 25"]


@pytest_twisted.ensureDeferred
async def test_user_with_colon_and_spaces(ident_server: ServerMaker) -> None:
    srv = ident_server("raw", raw=b"6191,25:USERID:UNIX,UTF-8:  bob:x  \r\n")
    assert await ask(srv.port) == "bob:x"


@pytest.mark.parametrize("mode", ["no-user", "hidden-user", "unknown-error", "invalid-port"])
@pytest_twisted.ensureDeferred
async def test_error_replies(ident_server: ServerMaker, mode: str) -> None:
    assert await ask(ident_server(mode).port) is None


@pytest.mark.parametrize("mode", ["garbage", "overlong", "mismatch", "close"])
@pytest_twisted.ensureDeferred
async def test_bad_replies(ident_server: ServerMaker, mode: str) -> None:
    start = time.monotonic()
    assert await ask(ident_server(mode).port, LONG_TIMEOUT) is None
    assert time.monotonic() - start < LONG_TIMEOUT / 2  # answered, not timed out


@pytest_twisted.ensureDeferred
async def test_overlong_without_newline(ident_server: ServerMaker) -> None:
    srv = ident_server("raw", raw=b"6191 , 25 : USERID : UNIX : " + b"z" * 5000)
    start = time.monotonic()
    assert await ask(srv.port, LONG_TIMEOUT) is None
    assert time.monotonic() - start < LONG_TIMEOUT / 2  # refused as too long, not timed out


@pytest.mark.parametrize(
    "user",
    [
        b"ev\ril",
        b"\rroot",
        b"nul\x00x",
        b"root@example.com",
        b"a(b)",
        b"[127.0.0.1]",
        b"back\\slash",
        b"caf\xc3\xa9",
        b"x" * 65,
        b"   ",
        b"tab\there",
    ],
)
@pytest_twisted.ensureDeferred
async def test_hostile_userid(ident_server: ServerMaker, user: bytes) -> None:
    srv = ident_server("raw", raw=b"6191 , 25 : USERID : UNIX : " + user + b"\r\n")
    assert await ask(srv.port) is None


@pytest_twisted.ensureDeferred
async def test_lf_splits_injection_attempt(ident_server: ServerMaker) -> None:
    # A bare LF ends the line: only the part before it counts, and the rest
    # of the "reply" is never read.
    srv = ident_server("raw", raw=b"6191 , 25 : USERID : UNIX : ev\nX-Injected: yes\r\n")
    assert await ask(srv.port) == "ev"


@pytest_twisted.ensureDeferred
async def test_refused() -> None:
    start = time.monotonic()
    assert await ask(unused_port(), LONG_TIMEOUT) is None
    assert time.monotonic() - start < LONG_TIMEOUT / 2  # the refusal ended it, not the timer


@pytest_twisted.ensureDeferred
async def test_hang_times_out(ident_server: ServerMaker) -> None:
    srv = ident_server("hang")
    start = time.monotonic()
    assert await ask(srv.port) is None
    elapsed = time.monotonic() - start
    # not before the 0.5 s given; well before the 3 s default
    assert TIMEOUT - 0.05 <= elapsed < DEFAULT_TIMEOUT / 2
    assert srv.requests == [b"6191 , 25"]
    # the client closed its socket
    assert await in_thread(wait_until, lambda: srv.open_connections == 0)


@pytest_twisted.ensureDeferred
async def test_cancel_closes_quietly(ident_server: ServerMaker) -> None:
    srv = ident_server("hang")
    d = ask(srv.port, timeout=LONG_TIMEOUT)
    # cancelled while the query is out (once the server has it), not before it connected
    assert await in_thread(wait_until, lambda: srv.requests)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert await in_thread(wait_until, lambda: srv.open_connections == 0)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"6191 , 25 : USERID : UNIX : alice", "alice"),
        (b"6191,25:userid:OTHER:alice", "alice"),
        (b"6191 , 25 : USERID : : alice", None),  # empty OS field
        (b"6191 , 26 : USERID : UNIX : alice", None),
        (b"+6191 , 25 : USERID : UNIX : alice", None),
        (b"6_191 , 25 : USERID : UNIX : alice", None),
        (b"6191 , 25 : ERROR : NO-USER", None),
        (b"6191 , 25 : USERID : UNIX", None),
        (b"", None),
    ],
)
def test_parse_ident_reply(line: bytes, expected: str | None) -> None:
    assert parse_ident_reply(line, REMOTE_PORT, LOCAL_PORT) == expected


def test_sanitize_userid_length_limit() -> None:
    assert sanitize_userid("u" * 64) == "u" * 64
    assert sanitize_userid("u" * 65) is None
