"""SMTPFactory: per-server state shared by every session (config, plugins, limits).

The factory is where a listening endpoint meets qpconn: it builds one
:class:`~qpconn.server.protocol.SMTPServerProtocol` per TCP connection and the
:class:`~qpconn.mail.connection.Connection` describing that connection's two ends.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import weakref
from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime, ITransport
from twisted.internet.protocol import ServerFactory

from qpconn.config import Config
from qpconn.core.session import Limits
from qpconn.hooks.plugin import Plugin, load_plugins
from qpconn.hooks.runner import HookRunner
from qpconn.hooks.tracing import SessionTrace, Tracer
from qpconn.kit.policy import NetworkList
from qpconn.mail.connection import Connection
from qpconn.mail.smtputf8 import smtputf8_offered
from qpconn.mail.spool import clean_stale_spool
from qpconn.server.deadlines import DeadlineSettings
from qpconn.server.fastpath import reads
from qpconn.server.idle import IdleTimers
from qpconn.server.lookup import make_resolver
from qpconn.server.peerinfo import LookupSettings, PeerInfo
from qpconn.server.protocol import SMTPServerProtocol
from qpconn.server.proxy import ProxySettings
from qpconn.server.retire import RetiredPlugins
from qpconn.server.tls import tls_from_config
from qpconn.settings import validate
from qpconn.smtp.commands import SMTPCommands
from qpconn.smtp.limits import ConnectionCounter, SessionLimits, limit_exceptions
from qpconn.smtp.lmtp import LMTPCommands
from qpconn.smtp.security import read_security_settings

__all__ = ["SMTPFactory", "address_parts"]

_UNKNOWN = object()
#: bind addresses that accept on every interface: the local address varies per socket
_WILDCARDS = frozenset({"0.0.0.0", "::", "::0", "0:0:0:0:0:0:0:0"})


def address_parts(address: IAddress) -> tuple[str | None, int | None]:
    """(ip, port) of a Twisted address; IPv4-mapped IPv6 is given as IPv4, unix as (None, None).

    Mapped addresses are unwrapped so that ``relayclients`` entries and logs see the
    address the peer really has, whatever socket family accepted it.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if not host:
        return None, None
    if ":" not in host:
        # IPv4 as the socket layer writes it (or a name): ip_address() would give it back
        # unchanged, so skip its cost on every connection.
        return host, port
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host, port
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port


class SMTPFactory(ServerFactory):
    """Builds SMTP sessions for one listening configuration.

    ``config`` is a :class:`~qpconn.config.Config` (defaults when omitted); ``plugins``
    overrides the config's plugin list (handy in tests and ``.tac`` files); ``commands``
    plugs in a subclass of :class:`~qpconn.smtp.commands.SMTPCommands` (what the sessions
    say) and ``lmtp_commands`` one of :class:`~qpconn.smtp.lmtp.LMTPCommands` for LMTP
    listeners; ``protocol`` a subclass of :class:`SMTPServerProtocol` (how bytes move);
    ``lookups`` chooses the peer lookups (:class:`~qpconn.server.peerinfo.LookupSettings`)
    and ``proxy`` the PROXY protocol policy (:class:`~qpconn.server.proxy.ProxySettings`).
    Timeouts left None in either come from the config files ``dns_timeout``,
    ``ident_timeout`` and ``proxy_timeout``.
    """

    protocol = SMTPServerProtocol
    #: the command handlers of SMTP sessions, and of sessions on LMTP listeners
    commands: type[SMTPCommands] = SMTPCommands
    lmtp_commands: type[SMTPCommands] = LMTPCommands
    #: connections accepted since start-up (metrics: ``qpconn_connections_total``)
    connections_total = 0
    #: the tracing back end (qpconn.app.tracing, ``--tracing``), or None: no spans, and a
    #: session pays one attribute check at its start and one at its end
    tracer: Tracer | None = None

    def __init__(
        self,
        config: Config | None = None,
        plugins: list[Plugin] | None = None,
        *,
        protocol: type[SMTPServerProtocol] | None = None,
        commands: type[SMTPCommands] | None = None,
        lmtp_commands: type[SMTPCommands] | None = None,
        clock: IReactorTime | None = None,
        lookups: LookupSettings | None = None,
        proxy: ProxySettings | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor  # type: ignore[assignment]
        self.config = config if config is not None else Config()
        #: what the validator (qpconn.settings) found odd but usable; it runs first, so
        #: every value read below is one it accepted (it raises ConfigError otherwise)
        self.config_warnings = validate(self.config, load_tls=False)
        self.clock = clock
        #: every session's idle timer, on this clock: one heap, one DelayedCall
        self.idle_timers = IdleTimers(clock)
        self.plugins = load_plugins(self.config) if plugins is None else list(plugins)
        self.runner = HookRunner(self.plugins, clock, self.config.get_float("plugin_timeout", 30.0))
        self.me = self.config.me
        self.timeout = self.config.get_float("timeout", 300.0)
        self.databytes = self.config.get_int("databytes", 0)
        self.size_threshold = self.config.get_int("size_threshold", 1 << 20)
        spool = self.config.get("spool_dir")
        self.spool_dir = self.config.path(spool) if spool else None
        # Spool files of a crashed (kill -9) predecessor would otherwise stay forever.
        clean_stale_spool(self.spool_dir)
        #: max_rcpt, max_errors, data_timeout, connection limits, bare_newline
        self.session_limits = SessionLimits.from_config(self.config)
        #: command_deadline, min_data_rate after data_rate_grace, max_session_time, as the
        #: sessions apply them (unset ones worked out from the idle timeouts, once)
        self.deadline_settings = DeadlineSettings.from_limits(self.session_limits, self.timeout)
        #: sessions admitted now, in all and per address, and opened lately per address
        #: (max_connections*, max_connection_rate)
        self.connection_counter = ConnectionCounter()
        #: addresses the per-address limits do not apply to (loopback, relay clients)
        self.connection_limit_exceptions = limit_exceptions(self.config)
        #: the STARTTLS certificate (tls_cert/tls_key, loaded now so a bad file stops the
        #: server) and the TLS/AUTH policy (tls_required, tls_before_auth, auth_max_failures)
        self.security = read_security_settings(self.config, tls_from_config(self.config))
        #: the proxies that may hand over their client's facts with XCLIENT (smtp/xclient.py)
        self.xclient_hosts = NetworkList("xclient_hosts", self.config.lines("xclient_hosts"))
        #: the core's size rules, one read-only object every session shares (a session
        #: that changes its own takes a copy: ServerSession.own_limits)
        self.limits = Limits(
            message_size=self.databytes,
            # SMTPUTF8 is offered unless `smtputf8 no`; addresses hold UTF-8 only after
            # MAIL ... SMTPUTF8 (smtp_extensions.py)
            utf8=smtputf8_offered(self.config),
            normalize_newlines=self.session_limits.normalize_newlines,
        ).shared()
        if protocol is not None:
            self.protocol = protocol
        if commands is not None:
            self.commands = commands
        if lmtp_commands is not None:
            self.lmtp_commands = lmtp_commands
        lookups = lookups or LookupSettings()
        self.lookups = dataclasses.replace(
            lookups,
            dns_timeout=lookups.dns_timeout or self.config.get_float("dns_timeout", 5.0),
            ident_timeout=lookups.ident_timeout or self.config.get_float("ident_timeout", 3.0),
        )
        #: the DNS resolver of this server (``--dns-server`` or resolv.conf), for lookups
        #: and for plugins (``self.server.resolver``), so every query obeys one setting
        self.resolver = make_resolver(self.lookups.dns_servers, self.lookups.dns_timeout or 5.0)
        #: the resolver for the host names the server connects to (next hops, HTTP and
        #: AMQP endpoints): this one with ``--dns-server``, else None, the system's
        #: getaddrinfo (which also reads /etc/hosts) as before (qpconn.client.names)
        self.hostname_resolver = self.resolver if self.lookups.dns_servers is not None else None
        self.peer_info = PeerInfo(self.lookups, clock, self.resolver)
        proxy = proxy or ProxySettings()
        #: PROXY protocol policy; the adapter reads it for every new connection
        self.proxy = dataclasses.replace(
            proxy, timeout=proxy.timeout or self.config.get_float("proxy_timeout", 5.0)
        )
        #: sessions currently open (for limits, shutdown and metrics)
        self.sessions: set[SMTPServerProtocol] = set()
        #: plugin sets a reload replaced, detached when their last session ends
        self.retired = RetiredPlugins(clock)
        #: listening port -> the local (ip, port) of every socket it accepts, or None
        self._port_addresses: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        for plugin in self.plugins:
            plugin.attach(self)

    def startFactory(self) -> None:
        """A listener starts: the reactor dispatches socket events without Twisted's
        per-event call layers (qpconn.server.fastpath.reads; Twisted's own dispatch where
        that cannot be done, or when the clock is not the reactor)."""
        reads.install(self.clock)

    def build_connection(self, transport: ITransport) -> Connection:
        """The Connection for a new transport, from its peer and host addresses."""
        connection = Connection()  # fields set directly: start()'s name checks are for plugins
        connection.remote_ip, connection.remote_port = address_parts(transport.getPeer())
        connection.local_ip, connection.local_port = self._local_address(transport)
        return connection

    def _local_address(self, transport: ITransport) -> tuple[str | None, int | None]:
        """Our side of a connection: the listening address when that names one interface.

        A socket accepted on a port bound to one address has exactly that address and
        port, so it is read once per listening port rather than with a getsockname() per
        connection; ports bound to a wildcard (0.0.0.0, ::) ask each socket.
        """
        port = getattr(transport, "server", None)  # Twisted's tcp.Server: its Port
        if port is None:
            return address_parts(transport.getHost())
        try:
            known = self._port_addresses.get(port, _UNKNOWN)
        except TypeError:  # not weakly referenceable
            return address_parts(transport.getHost())
        if known is _UNKNOWN:
            bound = port.getHost()
            host = getattr(bound, "host", None)
            one_interface = isinstance(host, str) and host and host not in _WILDCARDS
            known = address_parts(bound) if one_interface else None
            self._port_addresses[port] = known
        return known if known is not None else address_parts(transport.getHost())

    async def lookup_peer(self, connection: Connection) -> None:
        """Fill in what the network can tell about the peer before the connect hook runs:
        reverse DNS with forward confirmation, and ident when enabled."""
        await self.peer_info.fill(connection)

    def session_started(self, session: SMTPServerProtocol) -> None:
        self.sessions.add(session)
        self.connections_total += 1
        if getattr(self, "metrics", None) is not None:  # qpconn.app.metrics, --workers mode
            self.metrics.session_changed(True)
        if self.tracer is not None:  # its spans go with its handlers (qpconn.hooks.tracing)
            commands = session.commands
            commands.trace = SessionTrace(self.tracer, commands.connection)

    def session_ended(self, session: SMTPServerProtocol) -> None:
        if session in self.sessions and getattr(self, "metrics", None) is not None:
            self.metrics.session_changed(False)
        self.sessions.discard(session)
        if self.retired.waiting:
            self.retired.session_ended(session)
        commands = session.commands
        if commands.trace is not None:  # before the connection is reset: its facts go on
            commands.trace.session_ended(commands.connection)
            commands.trace = None

    def describe(self) -> dict[str, Any]:
        """A summary for logs: host name and plugin list."""
        return {"me": self.me, "plugins": [repr(p) for p in self.plugins]}
