"""Helpers for plugin authors: run plugins through a scripted SMTP session, in-process.

:func:`run_session` drives the real protocol class (the same code a server runs) over
an in-memory transport, with a fake clock and a DNS answer table instead of the
network, and returns every reply and every note the plugins left::

    from qpconn.testing import run_session

    result = run_session(["mycompany.nobounces"], [
        "EHLO client.example", "MAIL FROM:<>",
    ])
    assert result.codes == [220, 250, 550]

Time passes only while a hook waits: when a plugin sleeps on ``self.server.clock`` or a
DNS question is left unanswered, the fake clock jumps to the next timer at once, so
timeouts are tested in no time at all. A hook waiting on something the fake clock
cannot advance (a thread pool, a real socket) is cut off by ``plugin_timeout`` as a
running server would cut it off; test such plugins against a real server with the
``qpconn_address`` fixture (:mod:`qpconn.testing.pytest_plugin`).

The DNS table maps ``(name, type)`` to answers: a list of values (``"192.0.2.1"``,
``"mx.example"``, ``"10 mx.example"`` for MX, a string for TXT) or one of ``"nxdomain"``,
``"servfail"``, ``"timeout"``. A PTR key may be written with the IP address itself:
``("192.0.2.1", "PTR")``. A name not in the table is NXDOMAIN; a name in the table
asked for another type has no records of it (NODATA), as a real server answers.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from qpconn.config import Config
from qpconn.core.reply import Reply
from qpconn.hooks.plugin import Plugin, load_plugin
from qpconn.hooks.results import OK
from qpconn.hooks.runner import HookRunner
from qpconn.kit import threads as workers
from qpconn.server.factory import SMTPFactory
from qpconn.server.peerinfo import _SHARED_CACHE, LookupSettings, PeerInfo
from qpconn.testing.dnstable import DNSTable

__all__ = [
    "run_session",
    "send_message",
    "Harness",
    "INLINE_POOLS",
    "SessionResult",
    "TransactionRecord",
    "DNSTable",
    "RecordingQueue",
    "load_listed_plugins",
]

#: How many timer jumps one step may take before the helper gives up (a hook in a loop).
MAX_CLOCK_JUMPS = 10_000
_markers = itertools.count(1)

class RecordingQueue(Plugin):
    """A queue plugin that keeps each message it is given (appended after the plugins
    under test when ``run_session(queue=True)``): a message nobody else queued is kept
    here and answered ``250 Queued``."""

    def register(self, *args: str) -> None:
        self.messages: list[bytes] = []

    def hook_queue(self, transaction: Any) -> Any:
        message = b"".join(transaction.message_chunks())
        self.messages.append(message)
        transaction.notes["testing_message"] = message
        return OK, "Queued"


@dataclass
class TransactionRecord:
    """What one transaction ended with."""

    id: str
    sender: str | None
    recipients: list[str]
    notes: dict[str, Any]
    #: the queued message (header with our Received line, and body), if it got that far
    message: bytes | None


@dataclass
class SessionResult:
    """The replies, in order (the greeting first), and what the plugins noted."""

    replies: list[Reply]
    connection_notes: dict[str, Any]
    transactions: list[TransactionRecord]
    #: the connection's fields when the session ended (remote_host, relay_client, ...)
    connection: dict[str, Any]
    #: True when the server closed the connection (QUIT, a disconnect verdict, a limit)
    closed_by_server: bool
    dns: DNSTable = field(repr=False, default_factory=DNSTable)

    @property
    def codes(self) -> list[int]:
        return [reply.code for reply in self.replies]

    @property
    def messages(self) -> list[bytes]:
        return [t.message for t in self.transactions if t.message is not None]


def _parse_replies(data: bytes) -> list[Reply]:
    replies: list[Reply] = []
    lines: list[str] = []
    for raw in data.split(b"\r\n"):
        if len(raw) < 3 or not raw[:3].isdigit():
            continue
        lines.append(raw[4:].decode("utf-8", "replace"))
        if raw[3:4] != b"-":
            reply = Reply(int(raw[:3]), lines)
            if reply.enhanced:  # the wire repeats the enhanced code on every line
                prefix = reply.enhanced + " "
                rest = [line.removeprefix(prefix) for line in reply.lines[1:]]
                reply = Reply(reply.code, [reply.lines[0], *rest], reply.enhanced)
            replies.append(reply)
            lines = []
    return replies


def load_listed_plugins(
    config: Config, items: Iterable[Plugin | type[Plugin] | str]
) -> list[Plugin]:
    """Plugins from a test's list: instances as they are, classes made under their class
    name, strings loaded like lines of the ``plugins`` file (``"name arg..."``)."""
    loaded: list[Plugin] = []
    for item in items:
        if isinstance(item, Plugin):
            loaded.append(item)
        elif isinstance(item, type):
            loaded.append(item(config, item.__name__))
        else:
            words = item.split()
            loaded.append(load_plugin(config, words[0], *words[1:]))
    return loaded


#: worker pools (:mod:`qpconn.kit.threads`) whose work runs inline during a session: their
#: stores (SQLite, Redis) need no reactor, so greylisting and karma run on the fake clock
INLINE_POOLS = ("greylist", "karma")

ConfigSpec = Mapping[str, str | Sequence[str]] | str | os.PathLike[str] | None
#: ``step(item, replies) -> go on?`` (see :meth:`Harness.run`)
StepWatcher = Callable[[str | bytes | None, list[Reply]], bool]
PluginList = Iterable[Plugin | type[Plugin] | str] | None


class Harness:
    """One in-process server (config, plugins, clock, DNS table) for several sessions.

    A running server keeps its plugins from one client to the next; so does a harness:
    what a plugin remembers (greylisting's triplets, karma's scores, a connection count)
    carries over from one :meth:`run` to the next, and the test moves time on in between
    with ``harness.clock.advance(seconds)``. :func:`run_session` is one harness, one run.

    Use it as a context manager (or call :meth:`close`): a ``config`` mapping lives in a
    temporary directory until then. Arguments are those of :func:`run_session`.
    """

    def __init__(
        self,
        plugins: PluginList = None,
        *,
        config: ConfigSpec = None,
        dns_answers: Mapping[tuple[str, str], Any] | None = None,
        rdns: bool = True,
        queue: bool = True,
        clock: Clock | None = None,
        inline_pools: Iterable[str] = INLINE_POOLS,
    ) -> None:
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if isinstance(config, str | os.PathLike):
            config_dir = os.fspath(config)
        else:
            self._scratch = tempfile.TemporaryDirectory(prefix="qpconn-testing-")
            config_dir = self._scratch.name
            files: dict[str, str | Sequence[str]] = {"me": "mx.test", **(config or {})}
            for name, value in files.items():
                text = value if isinstance(value, str) else "\n".join(value) + "\n"
                with open(os.path.join(config_dir, name), "w", encoding="utf-8") as handle:
                    handle.write(text)
        self.config = Config(config_dir)
        self.clock = clock or Clock()
        #: the DNS table every session asks (its ``questions`` add up over the runs)
        self.dns = DNSTable(dns_answers)
        self.inline_pools = tuple(inline_pools)
        try:
            self.factory, self._marker = _build(self.config, plugins, self.dns, rdns, queue,
                                                self.clock)  # fmt: skip
        except BaseException:
            self.close()
            raise

    @property
    def plugins(self) -> list[Plugin]:
        """The loaded plugins, in order (with the recording queue last, if asked for)."""
        return list(self.factory.plugins)

    def plugin(self, name: str) -> Plugin:
        """The first loaded plugin called ``name`` (as in the list: ``"greylisting"``)."""
        for plugin in self.factory.plugins:
            if plugin.name == name:
                return plugin
        raise KeyError(name)

    def run(
        self,
        script: Sequence[str | bytes],
        *,
        remote_ip: str = "192.0.2.1",
        remote_port: int = 50000,
        early: bytes = b"",
        step: StepWatcher | None = None,
    ) -> SessionResult:
        """One client session from ``remote_ip``; see :func:`run_session`.

        ``step(item, replies)`` is called with the greeting (``item`` None) and after each
        item of the script with the replies it brought; when it returns False the rest of
        the script is not sent (``python -m qpconn test`` stops at a refused DATA).
        """
        with workers.inline_pools(*self.inline_pools):
            return _drive(
                self.factory, script, self.dns, remote_ip, remote_port, self.clock, early, step
            )

    def close(self) -> None:
        """Forget the cached lookups and remove the temporary config directory."""
        if getattr(self, "_marker", None) is not None:
            _SHARED_CACHE.pop((id(self.clock), (self._marker,)), None)
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_session(
    plugins: PluginList,
    script: Sequence[str | bytes],
    *,
    config: ConfigSpec = None,
    dns_answers: Mapping[tuple[str, str], Any] | None = None,
    remote_ip: str = "192.0.2.1",
    remote_port: int = 50000,
    rdns: bool = True,
    queue: bool = True,
    clock: Clock | None = None,
    early: bytes = b"",
    inline_pools: Iterable[str] = INLINE_POOLS,
) -> SessionResult:
    """Run ``script`` (commands as text, CRLF added; ``bytes`` sent as they are, e.g. a
    message ending in ``.\\r\\n``) against ``plugins`` (config lines, classes or
    instances; None: the config's ``plugins`` file) and return what happened.

    ``config`` is a directory path or a mapping of file name to contents (written to a
    temporary directory; ``me`` defaults to ``mx.test``). ``dns_answers`` is the DNS
    table; reverse DNS of ``remote_ip`` runs through it unless ``rdns`` is False.
    ``early`` is sent as soon as the client connects, before the greeting (a client
    that does not wait for it). The work of the worker pools named in ``inline_pools``
    is done in place (see :data:`INLINE_POOLS`).
    """
    with Harness(
        plugins,
        config=config,
        dns_answers=dns_answers,
        rdns=rdns,
        queue=queue,
        clock=clock,
        inline_pools=inline_pools,
    ) as harness:
        return harness.run(script, remote_ip=remote_ip, remote_port=remote_port, early=early)


def _build(
    config: Config,
    plugins: PluginList,
    table: DNSTable,
    rdns: bool,
    queue: bool,
    clock: Clock,
) -> tuple[SMTPFactory, tuple[str, int]]:
    # A named (never asked) server: a resolv.conf resolver would start a real timer.
    quiet = LookupSettings(rdns=False, dns_servers=[("127.0.0.1", 53)])
    factory = SMTPFactory(config, [], clock=clock, lookups=quiet)
    marker = ("qpconn.testing", next(_markers))
    settings = LookupSettings(
        rdns=rdns,
        dns_servers=[marker],  # type: ignore[list-item] # a cache key no real server has
        dns_timeout=factory.lookups.dns_timeout,
    )
    factory.resolver = table
    factory.peer_info = PeerInfo(settings, clock, table)
    loaded = load_listed_plugins(config, plugins) if plugins is not None else None
    if loaded is None:
        from qpconn.hooks.plugin import load_plugins

        loaded = load_plugins(config)
    if queue:
        loaded.append(RecordingQueue(config, "testing/queue"))
    factory.plugins = loaded
    factory.runner = HookRunner(loaded, clock, factory.runner.timeout)
    for plugin in loaded:
        plugin.attach(factory)
    return factory, marker


def _drive(
    factory: SMTPFactory,
    script: Sequence[str | bytes],
    table: DNSTable,
    remote_ip: str,
    remote_port: int,
    clock: Clock,
    early: bytes = b"",
    step: StepWatcher | None = None,
) -> SessionResult:
    family = IPv6Address if ":" in remote_ip else IPv4Address
    local = "::1" if family is IPv6Address else "127.0.0.1"
    transport = StringTransport(
        hostAddress=family("TCP", local, 25), peerAddress=family("TCP", remote_ip, remote_port)
    )
    proto = factory.buildProtocol(transport.getPeer())
    assert proto is not None
    proto.callLater = clock.callLater  # the idle timer: a DelayedCall on this clock
    created: list[Any] = []
    handlers = proto.commands_class or factory.commands

    class Recording(handlers):  # type: ignore[misc,valid-type]
        """The session's own handler class, remembering each transaction it makes."""

        def new_transaction(self) -> Any:
            created.append(super().new_transaction())
            return created[-1]

    proto.commands_class = Recording
    proto.makeConnection(transport)
    if early and not transport.disconnecting:
        proto.dataReceived(early)  # while the connect hooks still hold the greeting back
    _settle(proto, clock)
    seen = 0  # replies already given to ``step``
    for item in (None, *script):
        if item is not None:
            if transport.disconnecting:
                break
            proto.dataReceived(item if isinstance(item, bytes) else item.encode("utf-8") + b"\r\n")
            _settle(proto, clock)
        if step is not None:
            replies = _parse_replies(transport.value())
            seen, fresh = len(replies), replies[seen:]
            if not step(item, fresh):
                break
    closed_by_server = bool(transport.disconnecting)
    conn = proto.connection
    snapshot = {
        name: getattr(conn, name, None)
        for name in (
            "remote_ip",
            "remote_host",
            "remote_host_verified",
            "relay_client",
            "hello",
            "hello_host",
            "auth_user",
        )
    }
    notes = dict(conn.notes)
    records = [
        TransactionRecord(
            t.id,
            t.sender.format() if t.sender is not None else None,
            [r.format() for r in t.recipients],
            dict(t.notes),
            t.notes.get("testing_message"),
        )
        for t in created
        if t.sender is not None or t.recipients or t.notes
    ]
    proto.connectionLost(Failure(error.ConnectionDone()))
    _settle(proto, clock, closing=True)
    return SessionResult(
        _parse_replies(transport.value()), notes, records, snapshot, closed_by_server, table
    )


def _settle(proto: Any, clock: Clock, closing: bool = False) -> None:
    """Let time pass while a hook waits (or, closing, while disconnect hooks run)."""
    for _ in range(MAX_CLOCK_JUMPS):
        waiting = proto._busy or (closing and proto in proto.factory.sessions)
        calls = clock.getDelayedCalls()
        if not waiting or not calls:
            if waiting:
                raise RuntimeError(
                    "a hook is waiting on something the fake clock cannot advance "
                    "(a thread, a real socket): test it with a real server instead"
                )
            return
        clock.advance(max(0.0, min(call.getTime() for call in calls) - clock.seconds()))
    raise RuntimeError(f"a hook was still waiting after {MAX_CLOCK_JUMPS} timers")


def send_message(
    plugins: Iterable[Plugin | type[Plugin] | str] | None,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    *,
    helo: str = "client.example",
    **options: Any,
) -> SessionResult:
    """A whole delivery (EHLO, MAIL, RCPT..., DATA, the message, QUIT) through
    :func:`run_session`; ``message`` is dot-stuffed and terminated here."""
    body = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    lines = body.split(b"\r\n")
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    script: list[str | bytes] = [f"EHLO {helo}", f"MAIL FROM:<{sender}>"]
    script += [f"RCPT TO:<{rcpt}>" for rcpt in recipients]
    script += ["DATA", stuffed + b".\r\n", "QUIT"]
    return run_session(plugins, script, **options)
