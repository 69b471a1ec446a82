"""``--logger=qpconn.log.observers.fast_text``: the same lines as twistd's text log, every one
of them, in order, also those written while the server shuts down."""

from __future__ import annotations

import io
import smtplib
import threading
import time

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEventAsClassicLogText, formatTime
from twisted.python.failure import Failure

from qpconn.log import fasttext
from qpconn.log.fasttext import FLUSH_DELAY, MAX_PENDING, FastTextObserver
from tests.support.process import free_port, running, twistd_command
from tests.support.server import write_config
from tests.support.timing import wait_until


class Thing:
    name = "thing"

    def __repr__(self) -> str:
        return "<Thing>"

    def call(self) -> str:
        return "called"


def _event(fmt, **fields):
    return {
        "log_format": fmt,
        "log_time": fields.pop("log_time", time.time()),
        "log_namespace": "qpconn.smtp",
        "log_level": LogLevel.info,
        **fields,
    }


def _failure_event():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        return _event("{conn_id} handler failed", conn_id="c1", log_failure=Failure())


EVENTS = [
    _event(
        "{conn_id} {queue_id} {verdict} from={sender} to={rcpts} size={size} "
        "reply={code} elapsed={elapsed:.3f}s",
        conn_id="abc",
        queue_id="abc.1",
        verdict="accepted",
        sender="<a@example.org>",
        rcpts="<u@mx.test>,<v@mx.test>",
        size=1234,
        code=250,
        elapsed=0.00123,
    ),
    _event("{x!r} and {x!s} and {x!a} {n:>5}", x="é'", n=7),
    _event("plain text, no fields"),
    _event("two\nlines {a}", a="and\nthree"),
    _event("{thing.name} {thing.call()} {thing}", thing=Thing()),  # Twisted's own syntax
    _event("{missing} field"),  # unformattable: Twisted's message about it
    _event("{a:{width}}", a="x", width=4),  # nested spec
    _event("{unclosed", a=1),
    _event("{d[k]}", d={"k": "v"}),
    _event("", conn_id="x"),  # empty text: no line
    _event("with system {a}", a=1, log_system="pool-3"),
    {"log_time": time.time(), "log_namespace": "n", "log_level": LogLevel.warn},  # no format
    _event("no time {a}", a=1, log_time=None),
    _event("{b}", b=b"bytes"),
    _event('quotes " \' """ \\n {{braces}} {a!r:>12} {n:+08.2f}', a='"x"', n=3.14159),
    _event("{n:,} {p:.1%} {w:_^9} {h:#x}", n=1234567, p=0.25, w="mid", h=255),
    _event("{a:}{b!s:}", a=1, b=2),  # empty specs
    _event("{class} {def}", **{"class": "k", "def": "d"}),  # keywords are fine names
    _event("{a:{{}}}", a=1),  # a spec Twisted's formatter must judge
    _failure_event(),
]


@pytest.mark.parametrize("event", EVENTS, ids=range(len(EVENTS)))
def test_each_line_is_what_twistds_text_log_writes(event):
    out = io.StringIO()
    observer = FastTextObserver(out)
    observer(event)
    observer(dict(event))  # the second time from the cached plan
    observer.flush()
    expected = formatEventAsClassicLogText(event, formatTime=formatTime) or ""
    assert out.getvalue() == expected * 2


_LITERAL = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).map(
    lambda text: text.replace("{", "{{").replace("}", "}}")
)
_FIELD = st.sampled_from(["a", "b", "n"]).flatmap(
    lambda name: st.sampled_from(["", "!r", "!s", "!a"]).flatmap(
        lambda conversion: st.sampled_from(["", ":>6", ":<3", ":^5", ":.2", ":10.3"]).map(
            lambda spec: "{" + name + conversion + spec + "}"
        )
    )
)
_VALUE = st.one_of(st.text(max_size=8), st.integers(), st.floats(allow_nan=False), st.none())


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.tuples(_LITERAL, _FIELD), max_size=5),
    tail=_LITERAL,
    a=_VALUE,
    b=_VALUE,
    n=st.floats(allow_nan=False, allow_infinity=False),
)
def test_compiled_formats_give_what_twisted_gives(parts, tail, a, b, n):
    fmt = "".join(literal + field for literal, field in parts) + tail
    event = _event(fmt, a=a, b=b, n=n)
    out = io.StringIO()
    observer = FastTextObserver(out)
    observer(event)
    observer.flush()
    assert out.getvalue() == (formatEventAsClassicLogText(event, formatTime=formatTime) or "")


def test_time_stamps_follow_the_seconds():
    out = io.StringIO()
    observer = FastTextObserver(out)
    base = 1_700_000_000.0
    for offset in (0.1, 0.9, 1.0, 1.5, 61.2, 3600.7):
        observer(_event("at {t}", t=offset, log_time=base + offset))
    observer.flush()
    expected = "".join(
        formatEventAsClassicLogText(_event("at {t}", t=o, log_time=base + o), formatTime=formatTime)
        for o in (0.1, 0.9, 1.0, 1.5, 61.2, 3600.7)
    )
    assert out.getvalue() == expected


def test_pending_lines_are_bounded():
    """Past MAX_PENDING lines go out at once; flush() empties whatever waits."""
    out = io.StringIO()
    observer = FastTextObserver(out)
    for n in range(MAX_PENDING + 5):
        observer(_event("line {n}", n=n))
    observer.flush()
    lines = out.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == [str(n) for n in range(MAX_PENDING + 5)]


def test_twistd_writes_every_line_in_order_through_shutdown(tmp_path):
    port = free_port()
    log = tmp_path / "qpconn.log"
    config = write_config(
        str(tmp_path / "config"),
        {"plugins": ["rcpt_ok", "queue/discard"], "rcpthosts": "mx.test\n"},
    )
    command = twistd_command(
        "--logger=qpconn.log.observers.fast_text",
        "qpconn",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--config",
        config,
        "--no-rdns",
    )
    env = {"QPCONN_TEXT_LOG": str(log)}
    with running(command, port, str(tmp_path), env):
        for n in range(3):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                smtp.sendmail("a@example.org", ["u@mx.test"], f"Subject: {n}\r\n\r\nhi\r\n")
    text = log.read_text()
    lines = text.splitlines()
    accepted = [line for line in lines if " accepted from=<a@example.org> " in line]
    assert len(accepted) == 3
    for line in accepted:
        conn_id = line.split("] ", 1)[1].split()[0]
        at = lines.index(line)
        assert any(f"] {conn_id} connect from 127.0.0.1:" in x for x in lines[:at])
        assert f"[qpconn.server.protocol.SMTPServerProtocol#info] {conn_id} disconnect" in [
            x.split(" ", 1)[1] for x in lines[at + 1 :]
        ]
    sent = [line.split("] ", 1)[1].split()[1] for line in accepted]
    assert sent == sorted(sent, key=lambda queue_id: int(queue_id.split(".")[0], 16))
    # the lines of the reactor's last turns (SIGTERM, shutdown) are there too, last
    assert "Received SIGTERM, shutting down." in text
    assert lines[-1].endswith("Server Shut Down.")
    # the usual shape: "<RFC 3339 time> [namespace#level] text"
    assert all(line[:4].isdigit() and " [" in line for line in lines if line[:1] != "\t")


@pytest_twisted.ensureDeferred
async def test_lines_logged_in_the_reactor_and_from_a_thread_arrive_in_order():
    out = io.StringIO()
    observer = FastTextObserver(out)

    def from_thread() -> None:
        for n in range(3):
            observer(_event("thread {n}", n=n))

    observer(_event("reactor {n}", n=0))
    assert out.getvalue() == ""  # batched: written a little later
    await threads.deferToThread(from_thread)
    observer(_event("reactor {n}", n=1))
    assert await threads.deferToThread(wait_until, lambda: out.getvalue().count("\n") == 5)
    texts = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert texts == ["reactor 0", "thread 0", "thread 1", "thread 2", "reactor 1"]


class CountingOut(io.StringIO):
    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest_twisted.ensureDeferred
async def test_lines_of_several_turns_share_one_write(monkeypatch):
    """A busy server logs a few lines per reactor turn: they wait up to FLUSH_DELAY for
    others rather than costing a write() system call per turn."""
    # A second instead of 50 ms, so that five reactor turns fit in it on a loaded machine too
    monkeypatch.setattr(fasttext, "FLUSH_DELAY", 1.0)
    out = CountingOut()
    observer = FastTextObserver(out)
    for n in range(5):
        observer(_event("turn {n}", n=n))
        await deferLater(reactor, 0, lambda: None)  # the next reactor turn
    assert out.writes == 0  # five turns, nothing written yet
    assert await threads.deferToThread(wait_until, lambda: out.writes)
    assert out.writes == 1
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == [
        f"turn {n}" for n in range(5)
    ]
    assert FLUSH_DELAY <= 0.1  # what docs/running.md promises a tail -f reader


def test_an_event_logged_from_inside_a_write_is_not_lost_nor_deadlocked():
    """Twisted logs from signal handlers ("Received SIGTERM, shutting down."), which can
    run in the middle of the observer's own write: that line must come out too."""

    class Interrupted(io.StringIO):
        fired = False

        def write(self, text: str) -> int:
            written = super().write(text)
            if not self.fired:
                self.fired = True
                observer(_event("from a signal handler"))
                observer.flush()  # as the shutdown trigger may; must not recurse
            return written

    out = Interrupted()
    observer = FastTextObserver(out)

    def scenario() -> None:
        observer(_event("first"))
        observer.flush()

    worker = threading.Thread(target=scenario, daemon=True)  # a deadlock fails, not hangs
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the observer deadlocked on its own lock"
    texts = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert texts == ["first", "from a signal handler"]
