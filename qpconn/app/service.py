"""Building the server as a Twisted service, for ``twistd qpconn`` and for ``.tac`` files.

:func:`make_service` is the public entry point: the twistd plugin calls it with the
command-line options, and a ``.tac`` file calls it with the same arguments from Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore

from qpconn.config import Config
from qpconn.hooks.plugin import Plugin
from qpconn.log.level import LevelLogger, parse_level, set_level
from qpconn.server.backlog import with_default_backlog
from qpconn.server.factory import SMTPFactory
from qpconn.server.fastpath.listening import fail_start_on_bind_error
from qpconn.server.lmtp import LMTP_PREFIX, LMTPListenerFactory
from qpconn.server.peerinfo import LookupSettings
from qpconn.server.protocol import SMTPServerProtocol
from qpconn.server.proxy import ProxySettings
from qpconn.server.shutdown import GracefulShutdown
from qpconn.server.tlscontext import read_tls_policy
from qpconn.server.tlsendpoint import load_listen_files, parse_ssl_listen, ssl_endpoint
from qpconn.settings import log_warnings, plugin_warnings
from qpconn.smtp.commands import SMTPCommands

__all__ = [
    "describe_address",
    "make_service",
    "make_factory",
    "make_config",
    "add_operations",
    "parse_listen",
    "DEFAULT_LISTEN",
]

log = LevelLogger(namespace="qpconn.app.service")


def describe_address(address: Any, lmtp: bool = False) -> str:
    """A listening address as an endpoint string reads: ``tcp:127.0.0.1:2525``,
    ``tcp6:[::1]:25``, ``unix:/run/qpconn.sock``; ``lmtp:`` in front for an LMTP one."""
    if hasattr(address, "host") and hasattr(address, "port"):
        host, port = address.host, address.port
        text = f"tcp6:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
    elif hasattr(address, "name"):
        name = address.name.decode() if isinstance(address.name, bytes) else address.name
        text = f"unix:{name}"
    else:
        text = str(address)
    return ("lmtp:" if lmtp else "") + text


class LoggedListener(StreamServerEndpointService):
    """A listener that says, once it listens, where: ``listening on tcp:127.0.0.1:2525``.

    Twisted's own line for a new port ("SMTPFactory starting on 2525") names neither
    the address nor the protocol; it is debug chatter for qpconn (qpconn.log.level).
    """

    lmtp = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        log.info("listening on {address}", address=describe_address(port.getHost(), self.lmtp))
        return port


#: Loopback only, unprivileged port: a fresh install never listens on the world by accident.
DEFAULT_LISTEN = "tcp:2525:interface=127.0.0.1"


def make_config(
    config_dir: str | None = None,
    *,
    hostname: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> Config:
    """The Config of a directory with the command line's overrides (``--hostname`` for
    ``me``, ``--tls-cert``, ``--tls-key``), as the server and its validator see it."""
    overrides = {"me": hostname} if hostname else {}
    if tls_cert:
        overrides["tls_cert"] = tls_cert
    if tls_key:
        overrides["tls_key"] = tls_key
    return Config(config_dir, overrides)


def make_factory(
    config_dir: str | None = None,
    *,
    hostname: str | None = None,
    plugins: Sequence[Plugin] | None = None,
    protocol: type[SMTPServerProtocol] | None = None,
    commands: type[SMTPCommands] | None = None,
    lmtp_commands: type[SMTPCommands] | None = None,
    reactor: IReactorCore | None = None,
    lookups: LookupSettings | None = None,
    proxy: ProxySettings | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> SMTPFactory:
    """An SMTPFactory for a config directory (None: built-in defaults).

    ``lookups`` and ``proxy`` are the peer lookups and the PROXY protocol policy; a
    ``.tac`` file sets them here exactly as the command-line options do, e.g.
    ``proxy=ProxySettings(enabled=True, trusted=["192.0.2.10/32"])``. ``tls_cert`` and
    ``tls_key`` (PEM files) replace the config settings of those names, as ``--tls-cert``
    and ``--tls-key`` do: STARTTLS is offered with that certificate. ``commands`` and
    ``lmtp_commands`` are the command handler classes of SMTP and LMTP sessions
    (``docs/protocol.md``).
    """
    return SMTPFactory(
        make_config(config_dir, hostname=hostname, tls_cert=tls_cert, tls_key=tls_key),
        list(plugins) if plugins is not None else None,
        protocol=protocol,
        commands=commands,
        lmtp_commands=lmtp_commands,
        clock=reactor,
        lookups=lookups,
        proxy=proxy,
    )


def parse_listen(reactor: Any, description: str) -> tuple[Any, bool]:
    """One ``--listen`` string as (endpoint, speaks LMTP); ValueError/OSError if malformed.

    ``lmtp:ENDPOINT`` speaks LMTP on that endpoint (qpconn.server.lmtp). An ``ssl:`` one is
    parsed by qpconn (qpconn.server.tlsendpoint) and its certificate files are read now, as
    Twisted's parser would; it is made once the config's TLS policy is known, so what comes
    back for it is ``(ImplicitTLSListen, KeyPair)`` instead of an endpoint. A ``tcp:``,
    ``tcp6:`` or ``ssl:`` one without ``backlog=`` gets qpconn's (qpconn.server.backlog).
    """
    # A TCP listener waits with a backlog of qpconn's, not Twisted's 50 (server/backlog.py).
    inner = with_default_backlog(description.removeprefix(LMTP_PREFIX))
    implicit = parse_ssl_listen(inner)
    if implicit is not None:
        endpoint: Any = (implicit, load_listen_files(implicit))
    else:
        endpoint = serverFromString(reactor, inner)
    return endpoint, description.startswith(LMTP_PREFIX)


def make_service(
    listen: Sequence[str] = (DEFAULT_LISTEN,),
    config_dir: str | None = None,
    *,
    hostname: str | None = None,
    plugins: Sequence[Plugin] | None = None,
    protocol: type[SMTPServerProtocol] | None = None,
    commands: type[SMTPCommands] | None = None,
    lmtp_commands: type[SMTPCommands] | None = None,
    lookups: LookupSettings | None = None,
    proxy: ProxySettings | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> service.MultiService:
    """A service listening on every endpoint string in ``listen`` with one shared factory.

    Endpoint strings are Twisted's (``tcp:25``, ``tcp6:2525:interface=\\:\\:1``,
    ``unix:/run/qpconn.sock``, ``ssl:465:privateKey=...``, ``systemd:domain=INET:index=0``).
    Prefixed with ``lmtp:`` (``lmtp:tcp:2424``) a listener speaks LMTP (RFC 2033).
    Every listener shares the factory, so a ``proxy`` policy applies to all of them.
    A malformed endpoint string raises ValueError before anything else is set up.
    """
    from twisted.internet import reactor

    endpoints = [parse_listen(reactor, description) for description in listen]
    factory = make_factory(
        config_dir,
        hostname=hostname,
        plugins=plugins,
        protocol=protocol,
        commands=commands,
        lmtp_commands=lmtp_commands,
        lookups=lookups,
        proxy=proxy,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    # A service is the whole process: its config's loglevel becomes the process's
    # threshold for qpconn's own log events (qpconn.log.level).
    set_level(parse_level(factory.config.get("loglevel") or "debug"))
    # What `python -m qpconn check` would warn about, in the log (qpconn.settings).
    queue_hooks = len(factory.runner.plugins_for("queue"))
    log_warnings(
        factory.config_warnings + plugin_warnings(factory.config, factory.plugins, queue_hooks),
        factory.config.directory,
    )
    top = service.MultiService()
    top.setName("qpconn")
    # Stops with the listeners: lets messages in flight finish, then 421 (shutdown.py).
    GracefulShutdown(factory).setServiceParent(top)
    policy = None
    for endpoint, lmtp in endpoints:
        if isinstance(endpoint, tuple):  # ssl: under the config's TLS policy
            policy = policy or read_tls_policy(factory.config)
            listen, pair = endpoint
            endpoint = ssl_endpoint(reactor, listen, policy, pair)
        serving = LMTPListenerFactory(factory) if lmtp else factory
        listener = LoggedListener(endpoint, serving)
        listener.lmtp = lmtp
        fail_start_on_bind_error(listener)  # a port in use stops the start
        listener.setServiceParent(top)
    top.factory = factory  # type: ignore[attr-defined]
    return top


def add_operations(
    top: service.MultiService, metrics: str | None, *, tracing: bool = False
) -> None:
    """SIGHUP reloads the config (qpconn.app.reload); ``metrics`` (an endpoint string, or
    None) serves Prometheus figures; ``tracing`` exports OpenTelemetry spans of the
    sessions as the ``OTEL_*`` environment variables say (qpconn.app.tracing).

    What a service from :func:`make_service` gets when it runs a whole process, under
    ``twistd qpconn`` and in each ``--workers`` worker alike; it lives here, beside the
    service it completes, so that qpconn.app.options and qpconn.app.prefork both take it
    from here instead of from each other.
    """
    from qpconn.app.reload import ReloadOnSignal

    factory = top.factory  # type: ignore[attr-defined]
    factory.config.freeze()  # edits wait for the next SIGHUP, then apply all together
    ReloadOnSignal(factory).setServiceParent(top)
    if metrics:
        from qpconn.app.metrics import metrics_service  # prometheus_client: only when asked

        metrics_service(metrics, factory, top)
    if tracing:
        from qpconn.app.tracing import tracing_service  # opentelemetry: only when asked

        tracing_service(factory, top)
