"""fastpath.turnend: work left for the end of a reactor turn, one callLater(0) for all."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from qpconn.server.fastpath.turnend import at_turn_end
from tests.e2e_client import watch_errors


@pytest.fixture
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest_twisted.ensureDeferred
async def test_calls_run_once_after_the_turn_in_order_with_one_delayed_call(errors):
    done: list[str] = []
    before = len(reactor.getDelayedCalls())
    at_turn_end(lambda: done.append("a"))
    at_turn_end(lambda: done.append("b"))
    assert len(reactor.getDelayedCalls()) == before + 1  # one for the whole turn
    assert done == []  # not before the turn ends

    def broken() -> None:
        done.append("c")
        raise RuntimeError("one of them fails")

    at_turn_end(broken)
    at_turn_end(lambda: done.append("d"))
    await task.deferLater(reactor, 0.01, lambda: None)
    assert done == ["a", "b", "c", "d"]  # the failure kept no other call from running
    assert [e["log_format"] for e in errors] == ["end-of-turn call {function!r} failed"]
    errors.clear()


@pytest_twisted.ensureDeferred
async def test_a_call_made_while_they_run_waits_for_the_next_turn():
    done: list[str] = []

    def first() -> None:
        done.append("first")
        at_turn_end(lambda: done.append("later"))
        assert done == ["first"]  # not run inside this pass

    at_turn_end(first)
    await task.deferLater(reactor, 0.01, lambda: None)
    assert done == ["first", "later"]
