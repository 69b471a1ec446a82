"""Worker log events on their way to the parent (qpconn.log.relay).

What the parent publishes must format to the very text the worker's event would have
given, keep the structured fields, and keep a traceback; flat events take the cheap
plain-JSON form, anything else Twisted's form. The end-to-end path (workers writing,
the parent reading and logging with ``[worker-PID]``) is in tests/test_ops_workers.py.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from qpconn.log.fasttext import FastTextObserver
from qpconn.log.level import LevelLogger
from qpconn.log.relay import PLAIN, RelayObserver, decode, encode


def _capture(emit: Any) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    emit(events.append)
    (event,) = events
    return event


def _text(event: dict[str, Any]) -> str | None:
    return FastTextObserver(io.StringIO()).format(event)


def _transaction_event() -> dict[str, Any]:
    def emit(observer: Any) -> None:
        LevelLogger(namespace="qpconn.protocol", observer=observer).info(
            "{conn_id} {queue_id} {verdict} from={sender} to={rcpts} size={size} "
            "reply={code} elapsed={elapsed:.3f}s",
            conn_id="9f00000001",
            queue_id="9f00000001.1",
            verdict="accepted",
            sender="<a@example.org>",
            rcpts="<ü@mx.test>",
            size=1234,
            code=250,
            plugin=None,
            event="transaction",
            elapsed=0.0123456,
            relayed=True,
        )

    return _capture(emit)


def test_a_flat_event_goes_as_plain_json_and_comes_back_the_same():
    event = _transaction_event()
    record = encode(event)
    assert record.startswith(PLAIN) and "\n" not in record
    back = decode(record.encode("utf-8"))
    assert back is not None
    assert back["log_level"] is LogLevel.info
    for key in ("queue_id", "sender", "rcpts", "size", "code", "plugin", "elapsed", "relayed"):
        assert back[key] == event[key] and type(back[key]) is type(event[key])
    assert _text(back) == _text(event)
    assert "log_logger" not in back  # an object of the worker's process


def test_a_failure_keeps_its_traceback_through_twisteds_form():
    def emit(observer: Any) -> None:
        try:
            raise RuntimeError("plugin exploded")
        except RuntimeError:
            Logger(namespace="qpconn.hooks", observer=observer).failure(
                "plugin {plugin} failed", Failure(), plugin="boom"
            )

    event = _capture(emit)
    record = encode(event)
    assert record.startswith("\x1e")
    back = decode(record.encode("utf-8"))
    text = _text(back)
    assert text is not None
    # Twisted's form keeps the frames (the exception's value itself it cannot carry)
    assert "plugin boom failed" in text and "Traceback (most recent call last)" in text
    assert 'raise RuntimeError("plugin exploded")' in text


def test_a_field_that_is_not_flat_goes_twisteds_way_with_the_same_text():
    def emit(observer: Any) -> None:
        LevelLogger(namespace="x", observer=observer).warn(
            "peers {peers!r} and {count}", peers=("a", 1), count=2
        )

    event = _capture(emit)
    record = encode(event)
    assert record.startswith("\x1e")
    assert _text(decode(record.encode("utf-8"))) == _text(event)


@pytest.mark.parametrize(
    "record",
    [PLAIN + "not json", PLAIN + "[1, 2]", PLAIN + '{"log_level": "loud"}', "plain words"],
)
def test_garbled_records_are_a_value_error(record):
    with pytest.raises(ValueError):
        decode(record.encode())


def test_blank_records_are_skipped():
    assert decode(b"\x1e") is None
    assert decode(b"  ") is None


def test_the_observer_writes_one_record_per_line():
    out = io.StringIO()
    observer = RelayObserver(out)
    observer(_transaction_event())
    observer(_transaction_event())
    observer.flush()
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 3
    assert all(line.startswith(PLAIN) for line in lines[:2])
    assert decode(lines[0].encode())["queue_id"] == "9f00000001.1"
