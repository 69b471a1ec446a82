"""qpconn.server.fastpath.eager: a handler that never waits runs without a Deferred; one that
waits behaves exactly as under ``Deferred.fromCoroutine`` (results, failures thrown back
in, cancellation). The end-to-end tests cover it in the protocol; these pin the cases
one by one, each checked against ``fromCoroutine`` itself where they can be compared.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from qpconn.server.fastpath.eager import start


async def immediate() -> str:
    return "done"


async def raises() -> str:
    raise KeyError("boom")


async def waits(gate: defer.Deferred[str], log: list[str]) -> str:
    first = await gate
    log.append(first)
    return first + "!"


async def catches(gate: defer.Deferred[str]) -> str:
    try:
        await gate
    except ValueError as exc:
        return f"caught {exc}"
    return "not reached"


async def waits_twice(one: defer.Deferred[int], two: defer.Deferred[int]) -> int:
    return await one + await two


def test_a_handler_that_never_waits_gives_its_result_and_no_deferred():
    assert start(immediate()) == ("done", None)


def test_an_exception_comes_back_as_a_failure():
    result, deferred = start(raises())
    assert deferred is None
    assert isinstance(result, Failure) and result.check(KeyError)


def test_a_handler_that_waits_resumes_when_the_deferred_fires():
    gate: defer.Deferred[str] = defer.Deferred()
    log: list[str] = []
    result, deferred = start(waits(gate, log))
    assert result is None and deferred is not None
    got: list[Any] = []
    deferred.addCallback(got.append)
    assert got == [] and log == []
    gate.callback("go")
    assert log == ["go"] and got == ["go!"]


def test_an_already_fired_deferred_does_not_suspend():
    result, deferred = start(waits(defer.succeed("now"), []))
    assert (result, deferred) == ("now!", None)


@pytest.mark.parametrize("runner", ["eager", "twisted"])
def test_a_failure_is_thrown_into_the_handler_as_with_twisted(runner):
    gate: defer.Deferred[str] = defer.Deferred()
    if runner == "eager":
        _, deferred = start(catches(gate))
    else:
        deferred = defer.Deferred.fromCoroutine(catches(gate))
    got: list[Any] = []
    deferred.addCallback(got.append)
    gate.errback(ValueError("bad"))
    assert got == ["caught bad"]


@pytest.mark.parametrize("runner", ["eager", "twisted"])
def test_several_waits_and_an_uncaught_failure(runner):
    one: defer.Deferred[int] = defer.Deferred()
    two: defer.Deferred[int] = defer.Deferred()
    run = start if runner == "eager" else lambda c: (None, defer.Deferred.fromCoroutine(c))
    _, deferred = run(waits_twice(one, two))
    failures: list[Failure] = []
    deferred.addErrback(failures.append)
    one.callback(1)
    two.errback(OSError("down"))
    (failure,) = failures
    assert failure.check(OSError)


@pytest.mark.parametrize("runner", ["eager", "twisted"])
def test_cancelling_reaches_the_awaited_deferred(runner):
    cancelled: list[bool] = []
    gate: defer.Deferred[str] = defer.Deferred(lambda d: cancelled.append(True))
    if runner == "eager":
        _, deferred = start(waits(gate, []))
    else:
        deferred = defer.Deferred.fromCoroutine(waits(gate, []))
    failures: list[Failure] = []
    deferred.addErrback(failures.append)
    deferred.cancel()
    assert cancelled == [True]
    (failure,) = failures
    assert failure.check(defer.CancelledError)
