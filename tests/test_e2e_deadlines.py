"""Deadlines that no byte resets (issue 15, item 1): ``command_deadline``, ``min_data_rate``
after ``data_rate_grace``, ``max_session_time`` (qpconn.server.deadlines).

A client that sends one byte now and then restarts the idle timer with each byte; these
tests trickle bytes into a command line, into DATA and into a BDAT chunk on a real server
over loopback, and check that the 421 comes once the deadline is over (never before it,
within a generous bound after it), with its log event and metric; that a slow client
above the rate, a command split over a few packets and a message across the session's
cap are served; and that the time a hook of ours takes is not counted against the client.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from qpconn.app.metrics import ServerMetrics
from qpconn.config import Config
from qpconn.hooks.results import DECLINED
from qpconn.plugins import Plugin
from qpconn.smtp.limits import SessionLimits
from tests.e2e_client import Client, ehlo, logged_events, maildir_line, watch_errors
from tests.support.server import in_thread, write_config

RCPT = "<user@mx.test>"
#: how much later than its deadline a 421 may come on a loaded machine (never sooner)
MARGIN = 10.0


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture
def deadline_events() -> Iterator[list[dict[str, Any]]]:
    """The ``event="deadline"`` log events while the test runs."""
    with logged_events("deadline") as found:
        yield found


def trickle(smtp: Client, data: bytes, interval: float) -> tuple[bytes, float]:
    """Send ``data`` one byte every ``interval`` seconds until the server says something.

    Returns what it said (up to its close) and when (``time.monotonic()``) its first byte
    came. The wait between bytes is a read, so an answer ends it at once.
    """
    sock = smtp.sock
    answer = b""
    for index in range(len(data)):
        try:
            sock.sendall(data[index : index + 1])
        except OSError:
            break  # closed under us: what it said is read below
        sock.settimeout(interval)
        try:
            answer = sock.recv(4096)
        except TimeoutError:
            continue
        break
    answered = time.monotonic()
    sock.settimeout(MARGIN)
    try:
        while chunk := sock.recv(4096):
            answer += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return answer, answered


def in_data(smtp: Client) -> None:
    """MAIL, RCPT and DATA at normal speed: the message text is next."""
    assert smtp.code("MAIL FROM:<a@example.org>") == 250
    assert smtp.code(f"RCPT TO:{RCPT}") == 250
    assert smtp.code("DATA") == 354


def deadline_metric(metrics: ServerMetrics, limit: str) -> float:
    value = metrics.registry.get_sample_value("qpconn_deadlines_total", {"limit": limit})
    return value or 0.0


# -- command_deadline ----------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_command_line_trickled_in_gets_421_at_command_deadline(
    qpconn_server, deadline_events
):
    # One byte every 0.3 s: the idle timeout (10 s) never runs out, the deadline (1.5 s) does.
    server = qpconn_server(files={"timeout": "10", "command_deadline": "1.5"})
    metrics = ServerMetrics(server.factory).attach()

    def client() -> tuple[bytes, float]:
        with Client(server.address) as smtp:
            started = time.monotonic()
            answer, answered = trickle(smtp, b"EHLO a-very-slow-client.example.org\r\n", 0.3)
            return answer, answered - started

    try:
        answer, waited = await in_thread(client)
        await server.wait_sessions_closed()
        assert answer == b"421 4.4.2 mx.test Error: timeout exceeded (command line too slow)\r\n"
        assert 1.5 <= waited < 1.5 + MARGIN, waited
        assert not server.factory.sessions
        (event,) = deadline_events
        assert event["limit"] == "command_deadline"
        assert event["reason"] == "command line not complete 1.5s after its first byte"
        assert deadline_metric(metrics, "command_deadline") == 1
    finally:
        metrics.detach()


@pytest_twisted.ensureDeferred
async def test_the_deadline_counts_from_each_lines_first_byte(qpconn_server, deadline_events):
    # Whole commands sent slowly are not trickling: each line starts its deadline anew,
    # and a line split over a few packets within its deadline is served.
    server = qpconn_server(files={"timeout": "10", "command_deadline": "1"})

    def client() -> list[int]:
        with ehlo(server) as smtp:
            codes = []
            for _ in range(4):  # 4 x 0.6 s: longer than the deadline in all, never per line
                smtp.send(b"NO")
                time.sleep(0.3)  # the pacing of the client under test, not a wait for the server
                smtp.send(b"OP")
                time.sleep(0.3)
                codes.append(smtp.cmd(b"").code)  # the CRLF ends the line
            return codes

    assert await in_thread(client) == [250] * 4
    assert deadline_events == []


class SlowRcpt(Plugin):
    """rcpt: accepted after 2 seconds (longer than the command deadline)."""

    def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> Any:
        return task.deferLater(reactor, 2.0, lambda: DECLINED)


@pytest_twisted.ensureDeferred
async def test_a_hooks_time_is_not_counted_against_a_pipelined_partial_line(
    qpconn_server, tmp_path, deadline_events
):
    # The client pipelines RCPT and the start of NOOP; the rcpt hook takes 2 s, longer than
    # the deadline of 1 s: that wait was ours, so the line finished after it is answered.
    server = qpconn_server(
        files={"timeout": "10", "command_deadline": "1"},
        plugins=["relay", SlowRcpt, "rcpt_ok", maildir_line(tmp_path / "maildir")],
    )

    def client() -> list[int]:
        with ehlo(server) as smtp:
            assert smtp.code("MAIL FROM:<a@example.org>") == 250
            smtp.send(f"RCPT TO:{RCPT}\r\nNO".encode())
            rcpt = smtp.reply().code  # after the hook's 2 s
            smtp.send(b"OP\r\n")
            return [rcpt, smtp.reply().code]

    assert await in_thread(client) == [250, 250]
    assert deadline_events == []


# -- min_data_rate -------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_message_text_trickled_in_gets_421_under_min_data_rate(
    qpconn_server, deadline_events
):
    # About 3 octets a second against a minimum of 100 after a grace of 1 s; the idle
    # data_timeout (10 s) never runs out.
    server = qpconn_server(
        files={"timeout": "10", "data_timeout": "10", "data_rate_grace": "1",
               "min_data_rate": "100"}
    )  # fmt: skip

    def client() -> tuple[bytes, float]:
        with ehlo(server) as smtp:
            started = time.monotonic()  # before DATA: the window opens with the 354
            in_data(smtp)
            answer, answered = trickle(smtp, b"Subject: slow\r\n\r\n" + b"x" * 200, 0.3)
            return answer, answered - started

    answer, waited = await in_thread(client)
    await server.wait_sessions_closed()
    assert answer == b"421 4.4.2 mx.test Error: timeout exceeded (message data too slow)\r\n"
    assert 1.0 <= waited < 1.0 + MARGIN, waited
    assert server.messages() == []
    assert not server.factory.sessions
    (event,) = deadline_events
    assert event["limit"] == "min_data_rate"
    assert event["reason"].startswith("message text under 100 octets/s after the grace: ")


@pytest_twisted.ensureDeferred
async def test_bdat_octets_trickled_in_get_421_under_min_data_rate(qpconn_server, deadline_events):
    server = qpconn_server(
        files={"timeout": "10", "data_timeout": "10", "data_rate_grace": "1",
               "min_data_rate": "100"}
    )  # fmt: skip

    def client() -> tuple[bytes, float]:
        with ehlo(server) as smtp:
            assert smtp.code("MAIL FROM:<a@example.org>") == 250
            assert smtp.code(f"RCPT TO:{RCPT}") == 250
            started = time.monotonic()  # the window opens with the chunk
            smtp.send(b"BDAT 300 LAST\r\n")
            answer, answered = trickle(smtp, b"Subject: slow\r\n\r\n" + b"x" * 283, 0.3)
            return answer, answered - started

    answer, waited = await in_thread(client)
    await server.wait_sessions_closed()
    assert answer == b"421 4.4.2 mx.test Error: timeout exceeded (message data too slow)\r\n"
    assert 1.0 <= waited < 1.0 + MARGIN, waited
    assert server.messages() == []
    (event,) = deadline_events
    assert event["limit"] == "min_data_rate"


@pytest_twisted.ensureDeferred
async def test_the_rate_of_a_bdat_message_runs_across_its_chunks(qpconn_server, deadline_events):
    # Small chunks, each sent at once but with a pause before the next: the pauses count,
    # so the message as a whole falls under the rate although every chunk was fast.
    server = qpconn_server(
        files={"timeout": "10", "data_timeout": "10", "data_rate_grace": "1",
               "min_data_rate": "100"}
    )  # fmt: skip

    def client() -> list[int]:
        with ehlo(server) as smtp:
            assert smtp.code("MAIL FROM:<a@example.org>") == 250
            assert smtp.code(f"RCPT TO:{RCPT}") == 250
            codes = []
            for _ in range(40):  # 10 octets every 0.3 s: 33 octets/s in all
                smtp.send(b"BDAT 10\r\n0123456789")
                reply = smtp.reply()
                codes.append(reply.code)
                if reply.code != 250:
                    break
                time.sleep(0.3)  # the client's pace between chunks
            return codes

    codes = await in_thread(client)
    assert codes[-1] == 421 and set(codes[:-1]) == {250}, codes
    assert len(codes) >= 4  # not before the grace (1 s) was over
    (event,) = deadline_events
    assert event["limit"] == "min_data_rate"


@pytest_twisted.ensureDeferred
async def test_a_slow_client_above_the_rate_is_served(qpconn_server, deadline_events):
    # 1000 octets a second for 3 s against a minimum of 50 after 1 s: twenty times the rate.
    server = qpconn_server(
        files={"timeout": "10", "command_deadline": "5", "data_rate_grace": "1",
               "min_data_rate": "50"}
    )  # fmt: skip
    body = b"".join(b"line %03d " % n + b"y" * 189 + b"\r\n" for n in range(15))

    def client() -> int:
        with ehlo(server) as smtp:
            in_data(smtp)
            smtp.send(b"Subject: slow but fine\r\n\r\n")
            for start in range(0, len(body), 200):
                smtp.send(body[start : start + 200])
                time.sleep(0.2)  # the client's pace
            return smtp.message(b"").code

    assert await in_thread(client) == 250
    (message,) = server.messages()
    assert body.replace(b"\r\n", b"\n") in message  # the Maildir holds LF line ends
    assert deadline_events == []


# -- max_session_time ----------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_the_first_command_after_max_session_time_gets_421(qpconn_server, deadline_events):
    server = qpconn_server(files={"max_session_time": "1"})

    def client() -> tuple[list[int], float, bool]:
        started = time.monotonic()
        with ehlo(server) as smtp:
            codes = []
            for _ in range(100):  # a harmless command every 0.1 s: never idle, never wrong
                reply = smtp.cmd("NOOP")
                codes.append(reply.code)
                if reply.code != 250:
                    assert reply.last == "4.4.2 mx.test Error: session time limit exceeded"
                    break
                time.sleep(0.1)  # the client's pace
            return codes, time.monotonic() - started, smtp.is_closed()

    codes, lasted, closed = await in_thread(client)
    assert codes[-1] == 421 and set(codes[:-1]) == {250}, codes
    assert 1.0 <= lasted < 1.0 + MARGIN, lasted
    assert closed
    (event,) = deadline_events
    assert (event["limit"], event["reason"]) == ("max_session_time", "session longer than 1s")


@pytest_twisted.ensureDeferred
async def test_a_message_in_progress_at_max_session_time_is_finished(
    qpconn_server, deadline_events
):
    server = qpconn_server(files={"max_session_time": "1"})

    def client() -> tuple[int, int]:
        with ehlo(server) as smtp:
            in_data(smtp)
            for _ in range(6):  # text across the cap, well above the data rate
                smtp.send(b"x" * 900 + b"\r\n")
                time.sleep(0.3)  # the client's pace
            end = smtp.message(b"").code
            return end, smtp.cmd("NOOP").code

    assert await in_thread(client) == (250, 421)
    assert len(server.messages()) == 1
    (event,) = deadline_events
    assert event["limit"] == "max_session_time"


# -- the settings ----------------------------------------------------------------------------
def test_unset_deadlines_follow_the_idle_timeouts_up_to_their_caps(tmp_path):
    def limits(files: dict[str, str]) -> SessionLimits:
        return SessionLimits.from_config(Config(write_config(str(tmp_path / "c"), files)))

    defaults = limits({})
    assert defaults.command_deadline_for(300.0) == 60.0
    assert defaults.command_deadline_for(10.0) == 10.0  # never longer than silence allows
    assert defaults.data_rate_grace_for(300.0) == 30.0
    assert defaults.data_rate_grace_for(10.0) == 10.0
    assert (defaults.min_data_rate, defaults.max_session_time) == (500, 3600.0)
    short_data = limits({"data_timeout": "5"})
    assert short_data.data_rate_grace_for(300.0) == 5.0
    off = limits({"command_deadline": "0", "min_data_rate": "0", "max_session_time": "0"})
    assert off.command_deadline_for(300.0) is None
    assert (off.min_data_rate, off.max_session_time) == (0, 0.0)
    assert limits({"data_rate_grace": "0"}).data_rate_grace_for(300.0) == 0.0
