"""End-to-end: every qpsmtpd hook exists, a real session calls each, and a failing one is 451.

A plugin implementing every hook of issue 2's list is put in front of the usual ones,
and one session that exercises every command is run against the real server: each hook
must have been called, with the arguments docs/plugins.md documents. A hook whose
Deferred fails (rather than raising at once) gives 451 and a logged traceback, and the
session goes on.
"""

from __future__ import annotations

import time
from typing import Any

import pytest_twisted
from twisted.internet import defer

from qpconn import DENY
from qpconn.hooks.results import Result
from qpconn.mail.address import Address
from qpconn.plugins import HOOKS, Plugin
from tests.e2e_client import Client, logged_errors
from tests.support.server import in_thread
from tests.support.timing import assert_within_timeout

#: The hooks issue 2 names, with qpsmtpd's spelling.
ISSUE_HOOKS = (
    "pre-connection", "connect", "helo", "ehlo", "mail_pre", "mail", "rcpt_pre", "rcpt",
    "data", "data_headers_end", "data_post", "queue_pre", "queue", "queue_post",
    "reset_transaction", "disconnect", "post-connection", "unrecognized_command", "vrfy",
    "noop", "help", "quit", "deny", "ok", "received_line",
)  # fmt: skip


def test_every_hook_of_the_issue_exists_with_qpsmtpd_spelling():
    assert set(ISSUE_HOOKS) <= set(HOOKS)
    for hook in ISSUE_HOOKS:
        # A plugin method for each, named hook_ + the name with - as _.
        method = "hook_" + hook.replace("-", "_")
        assert method.isidentifier(), method


class Everything(Plugin):
    """Records (hook, arguments) for every hook; decides nothing, but denies deny@."""

    def register(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        for hook in HOOKS:
            if hook.startswith("auth"):
                continue
            self.register_hook(hook, self._recorder(hook))

    def _recorder(self, hook: str) -> Any:
        def record(transaction: Any, *args: Any) -> Any:
            assert transaction is not None and transaction.connection is not None
            self.calls.append((hook, args))
            if hook == "mail" and args[0].user == "deny":
                return DENY
            return None

        return record

    def called(self, hook: str) -> list[tuple[Any, ...]]:
        return [args for name, args in self.calls if name == hook]


@pytest_twisted.ensureDeferred
async def test_a_session_calls_every_hook_with_its_documented_arguments(qpconn_server):
    everything = Everything(None, "everything")  # type: ignore[arg-type]
    server = qpconn_server(plugins=[everything, "relay", "rcpt_ok", "queue/discard"])

    def client() -> list[int]:
        with Client(server.address) as smtp:
            codes = [smtp.greeting.code]
            for command in (
                "HELO old.test",
                "EHLO client.test",
                "MAIL FROM:<a@example.org> SIZE=20",
                "RCPT TO:<user@mx.test>",
            ):
                codes.append(smtp.cmd(command).code)
            codes.append(smtp.cmd("DATA").code)
            codes.append(smtp.message(b"Subject: all hooks\r\n\r\nbody").code)
            for command in (
                "VRFY someone",
                "NOOP",
                "HELP mail",
                "XFOO bar baz",
                "MAIL FROM:<deny@example.org>",
                "MAIL FROM:<b@example.org>",
                "RSET",
                "QUIT",
            ):
                codes.append(smtp.cmd(command).code)
            return codes

    codes = await in_thread(client)
    await server.wait_sessions_closed()
    assert codes == [220, 250, 250, 250, 250, 354, 250, 252, 250, 214, 500, 550, 250, 250, 221]
    missing = [hook for hook in ISSUE_HOOKS if not everything.called(hook)]
    assert missing == []

    assert everything.called("helo") == [("old.test",)]
    assert everything.called("ehlo") == [("client.test",)]
    assert everything.called("mail_pre")[0] == ("<a@example.org> SIZE=20",)
    sender, params = everything.called("mail")[0]
    assert isinstance(sender, Address) and sender.address == "a@example.org"
    assert params == {"SIZE": "20"}
    assert everything.called("rcpt_pre") == [("<user@mx.test>",)]
    ((recipient, rcpt_params),) = everything.called("rcpt")
    assert recipient.address == "user@mx.test" and rcpt_params == {}
    for hook in ("pre-connection", "connect", "data", "data_headers_end", "data_post"):
        assert everything.called(hook) == [()], hook
    for hook in ("queue_pre", "queue", "queue_post", "received_line", "quit"):
        assert everything.called(hook) == [()], hook
    assert everything.called("disconnect") == [()]
    assert everything.called("post-connection") == [()]
    assert everything.called("vrfy") == [("someone",)]
    assert everything.called("noop") == [("",)]
    assert everything.called("help") == [("mail",)]
    assert everything.called("unrecognized_command") == [("XFOO", "bar baz")]
    # Ended by the message, then by RSET (an open transaction with a sender); QUIT and the
    # disconnect do not count as a reset.
    assert len(everything.called("reset_transaction")) == 2
    # ok: rcpt_ok said OK at rcpt, queue/discard OK at queue; deny: our own DENY at mail.
    oks = {(args[0], args[1], args[2]) for args in everything.called("ok")}
    assert ("rcpt_ok", "rcpt", Result.OK) in oks and ("queue/discard", "queue", Result.OK) in oks
    (denied,) = everything.called("deny")
    assert denied[:3] == ("everything", "mail", Result.DENY)
    # The order of a session: the connection hooks first, the disconnection ones last.
    order = [name for name, _ in everything.calls]
    assert order[:2] == ["pre-connection", "connect"]
    assert order[-2:] == ["disconnect", "post-connection"]
    message_hooks = ["data", "data_headers_end", "received_line", "data_post", "queue_pre",
                     "queue", "queue_post"]  # fmt: skip
    assert [name for name in order if name in message_hooks] == message_hooks


class FailLater(Plugin):
    """mail: a Deferred that fails on the next reactor turn for fail@ senders."""

    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        if sender.user != "fail":
            return None
        from twisted.internet import reactor, task

        def explode() -> None:
            raise RuntimeError("asynchronous plugin bug")

        return task.deferLater(reactor, 0.01, explode)


class FailAsync(Plugin):
    """rcpt: an async def hook that raises after awaiting something."""

    async def hook_rcpt(self, transaction: Any, recipient: Any, params: Any) -> Any:
        await defer.succeed(None)
        if recipient.user == "fail":
            raise ValueError("coroutine plugin bug")
        return None


@pytest_twisted.ensureDeferred
async def test_a_failing_deferred_or_coroutine_gives_451_a_traceback_and_the_session_goes_on(
    qpconn_server,
):
    server = qpconn_server(plugins=[FailLater, FailAsync, "rcpt_ok", "queue/discard"])

    def client() -> list[tuple[int, str]]:
        with Client(server.address) as smtp:
            smtp.cmd("EHLO client.test")
            replies = [smtp.cmd("MAIL FROM:<fail@example.org>")]
            replies.append(smtp.cmd("MAIL FROM:<ok@example.org>"))
            replies.append(smtp.cmd("RCPT TO:<fail@mx.test>"))
            replies.append(smtp.cmd("RCPT TO:<user@mx.test>"))
            assert smtp.code("DATA") == 354
            replies.append(smtp.message(b"Subject: x\r\n\r\ny"))
            return [(reply.code, reply.last) for reply in replies]

    with logged_errors() as errors:
        replies = await in_thread(client)
        await server.wait_sessions_closed()
    assert replies[0] == (451, "4.3.0 Internal error - try again later")
    assert replies[1][0] == 250
    assert replies[2] == (451, "4.3.0 Internal error - try again later")
    assert [code for code, _ in replies[3:]] == [250, 250]
    tracebacks = [e["log_failure"].getTraceback() for e in errors if "log_failure" in e]
    assert any("asynchronous plugin bug" in text for text in tracebacks), tracebacks
    assert any("coroutine plugin bug" in text for text in tracebacks), tracebacks


class SlowCoroutine(Plugin):
    """mail: an async def hook that waits forever; notes whether it was cancelled."""

    def register(self) -> None:
        self.cancelled = 0

    async def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        try:
            await defer.Deferred()
        except defer.CancelledError:
            self.cancelled += 1
            raise
        return None


@pytest_twisted.ensureDeferred
async def test_config_plugin_timeout_bounds_a_hook_without_its_own_timeout(qpconn_server):
    slow = SlowCoroutine(None, "slow")  # type: ignore[arg-type]
    server = qpconn_server(files={"plugin_timeout": "0.3"}, plugins=[slow, "rcpt_ok"])
    assert slow.timeout is None  # so the setting applies

    def client() -> tuple[tuple[int, str], float, int]:
        with Client(server.address) as smtp:
            smtp.cmd("EHLO client.test")
            started = time.monotonic()
            reply = smtp.cmd("MAIL FROM:<a@example.org>")
            waited = time.monotonic() - started
            return (reply.code, reply.last), waited, smtp.code("NOOP")

    with logged_errors() as errors:
        reply, waited, noop = await in_thread(client)
        await server.wait_sessions_closed()
    assert reply == (451, "4.3.0 Internal error - try again later")
    # it waited for the 0.3 s limit (not the 30 s default), and the session goes on
    assert_within_timeout(waited, fired=0.3, instead_of=30)
    assert noop == 250
    assert slow.cancelled == 1  # CancelledError reached the coroutine's await
    assert errors, "the timeout is logged"
