"""Graceful shutdown: stop accepting, let messages in flight finish, 421 the rest.

On SIGTERM (twistd stops the reactor, which stops the services first) the listeners stop
accepting at once. Sessions that are between transactions or in the envelope get
``421 4.3.2 <me> Service shutting down`` and are closed. A session that is receiving a
message, or whose message is being queued, is left alone for up to ``shutdown_timeout``
seconds (default 30), so that a client already sending a message gets its real answer
(a 250 that means the message is stored) instead of losing its work; as soon as that
transaction is over it gets the 421 too. When the grace period ends, whoever is left
gets the 421 and is closed: a client that had not received a 250 keeps its message and
retries elsewhere or later, so nothing acknowledged is lost either way.

The service's ``stopService`` Deferred fires when every session has ended (or a second
after the last 421s) and every plugin's ``detach`` has run (:mod:`qpconn.server.retire`),
which is what keeps twistd from exiting earlier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from qpconn.core.reply import Reply
from qpconn.core.session import State

if TYPE_CHECKING:
    from qpconn.server.factory import SMTPFactory
    from qpconn.server.protocol import SMTPServerProtocol

__all__ = ["GracefulShutdown", "in_message"]

#: how often the sessions are looked at while draining
POLL = 0.05
#: how long closed sessions get to run their disconnect hooks after the last 421
LINGER = 1.0


def in_message(protocol: SMTPServerProtocol) -> bool:
    """True while the session receives message text or a command's handler (the queue
    hook, typically) is still at work: the moments a 421 would throw work away."""
    if protocol.lost:
        return False
    return protocol.session.state is State.DATA or protocol._inflight is not None


def say_goodbye(protocol: SMTPServerProtocol, me: str) -> None:
    """421 (RFC 5321 §3.8: the server must shut down) and close after it is written."""
    if protocol.session.closed or protocol.lost:
        return
    protocol.close_with(Reply(421, f"4.3.2 {me} Service shutting down"))


class GracefulShutdown(Service):
    """A service whose stop drains the factory's sessions; see the module docstring."""

    log = Logger(namespace="qpconn.shutdown")

    def __init__(self, factory: SMTPFactory, grace: float | None = None) -> None:
        self.factory = factory
        self.grace = grace if grace is not None else factory.config.get_float(
            "shutdown_timeout", 30.0
        )

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self.drain())

    async def drain(self) -> None:
        clock: Any = self.factory.clock
        sessions = self.factory.sessions
        if sessions:
            self.log.info(
                "shutting down: {count} sessions open, {grace}s for messages in flight",
                count=len(sessions),
                grace=self.grace,
            )
        deadline = clock.seconds() + self.grace
        while sessions:
            late = clock.seconds() >= deadline
            for protocol in list(sessions):
                if late or not in_message(protocol):
                    say_goodbye(protocol, self.factory.me)
            if late:
                break
            await task.deferLater(clock, POLL)
        ends = clock.seconds() + LINGER
        while sessions and clock.seconds() < ends:
            await task.deferLater(clock, POLL)
        for protocol in list(sessions):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
        # Every plugin (the running set and any a reload retired) releases what it holds.
        await self.factory.retired.detach_all(self.factory.plugins)
