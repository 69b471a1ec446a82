"""``twistd qpconn``: command-line options and the service they describe."""

from __future__ import annotations

import sys
from typing import NoReturn

from twisted.application.service import IService
from twisted.python import usage

from qpconn.app.service import (
    DEFAULT_LISTEN,
    add_operations,
    make_config,
    make_service,
    parse_listen,
)
from qpconn.config import ConfigError
from qpconn.hooks.plugin import PluginLoadError
from qpconn.server.peerinfo import LookupSettings
from qpconn.server.proxy import ProxySettings, parse_networks
from qpconn.settings import validate

__all__ = ["Options", "makeService", "build_service"]


class Options(usage.Options):
    """Options of ``twistd qpconn``."""

    synopsis = (
        "[--listen ENDPOINT ...] [--lmtp ENDPOINT ...] [--config DIR] [--hostname NAME] "
        "[--proxy-protocol [--proxy-from CIDR ...]] [--metrics ENDPOINT] [--tracing]"
    )
    longdesc = (
        "An SMTP server with qpsmtpd-style plugins. With no --config it accepts mail for "
        "localhost and this host's name and stores it in ./maildir."
    )
    def opt_version(self) -> None:
        """Display qpconn's version (with Twisted's and Python's) and exit."""
        import platform

        from qpconn import __version__
        from twisted import copyright

        python = platform.python_version()
        print(f"qpconn {__version__} (Twisted {copyright.version}, Python {python})")
        sys.exit(0)

    optParameters = [
        ["config", "c", None, "qpsmtpd-style config directory (plugins, me, rcpthosts, ...)"],
        ["hostname", None, None, "name of this server (overrides the config file 'me')"],
        ["ident-port", None, 113, "port of the peers' ident service", int],
        ["metrics", None, None, "endpoint serving Prometheus metrics (tcp:9125:interface=...)"],
        ["tls-cert", None, None, "PEM certificate (and chain) for STARTTLS (config tls_cert)"],
        ["tls-key", None, None, "PEM private key for --tls-cert if not in it (config tls_key)"],
        [
            "workers",
            None,
            None,
            "N worker processes sharing the listeners, supervised by this one "
            "(qpconn.app.prefork); default: this process serves",
            int,
        ],
    ]
    optFlags = [
        ["no-rdns", None, "do not look up the peer's name (remote_host stays None)"],
        ["ident", None, "ask the peer's RFC 1413 ident service (sets remote_info)"],
        [
            "proxy-protocol",
            None,
            "require a HAProxy PROXY header (v1 or v2) from trusted balancers on every "
            "connection; other peers are refused (config proxy_timeout, default 5 s)",
        ],
        [
            "tracing",
            None,
            "OpenTelemetry spans of every session, transaction and hook run, exported as the "
            "OTEL_* environment variables say (needs the otel extra; qpconn.app.tracing)",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["dns-server"] = []
        self["proxy-from"] = []

    def opt_dns_server(self, server: str) -> None:
        """DNS server HOST[:PORT] or [IPv6]:PORT instead of resolv.conf, repeatable"""
        try:
            self["dns-server"].append(parse_host_port(server, 53))
        except ValueError as exc:
            raise usage.UsageError(f"--dns-server {server!r}: {exc}") from None

    def opt_proxy_from(self, cidr: str) -> None:
        """trusted balancer CIDR, repeatable; implies --proxy-protocol [default: loopback]"""
        try:
            parse_networks([cidr])
        except ValueError as exc:
            raise usage.UsageError(f"--proxy-from {cidr!r}: {exc}") from None
        self["proxy-from"].append(cidr)

    def opt_listen(self, endpoint: str) -> None:
        """Twisted server endpoint string, repeatable [default: tcp:2525:interface=127.0.0.1]"""
        self["listen"].append(endpoint)

    def opt_lmtp(self, endpoint: str) -> None:
        """endpoint that speaks LMTP (RFC 2033), repeatable; same as --listen lmtp:ENDPOINT"""
        self["listen"].append("lmtp:" + endpoint)

    def postOptions(self) -> None:
        """Check and convert the options and the config directory; build nothing.

        Options parsing has no side effects (no plugin is loaded, no directory made):
        :func:`makeService` builds. What is checked here: the endpoint strings (a bad
        one is a usage error, as any bad option value), ``--workers``, and every setting
        of the config directory, through the validator that ``python -m qpconn check``
        and a SIGHUP reload use (qpconn.settings). A bad setting is not a usage error:
        under twistd it is reported in two lines (the problem, where to read about the
        options), not after twistd's page of usage text.
        """
        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString

        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        try:
            if self["workers"] is not None:  # before make_service parses the endpoints
                if self["workers"] < 1:
                    raise ValueError("--workers must be at least 1")
                from qpconn.app.prefork import check_shareable

                check_shareable(self["listen"])
            for description in self["listen"]:  # malformed: ValueError now
                parse_listen(reactor, description)
            if self["metrics"]:
                serverFromString(reactor, self["metrics"])
        except (ValueError, OSError) as exc:
            # OSError: an endpoint naming a file that cannot be read (ssl:...:privateKey=).
            raise usage.UsageError(str(exc)) from exc
        if self["tracing"]:
            check_tracing()
        self["lookups"] = lookup_settings(self)
        self["proxy"] = proxy_settings(self)
        try:
            config = make_config(
                self["config"],
                hostname=self["hostname"],
                tls_cert=self["tls-cert"],
                tls_key=self["tls-key"],
            )
            validate(config)
        except ConfigError as exc:
            config_failure(self, exc)


def check_tracing() -> None:
    """UsageError unless ``--tracing`` can work: OpenTelemetry's SDK is installed and the
    exporters ``OTEL_TRACES_EXPORTER`` names are too (nothing is started here)."""
    try:
        from qpconn.app.tracing import tracing_problems
    except ImportError as exc:
        raise usage.UsageError(
            f"--tracing needs OpenTelemetry ({exc}): pip install 'qpconn[otel]'"
        ) from None
    problems = tracing_problems()
    if problems:
        raise usage.UsageError("--tracing: " + "; ".join(problems))


def config_failure(options: usage.Options, exc: Exception) -> NoReturn:
    """Stop for a config directory that cannot be used.

    Under twistd (``options.parent`` is its ServerOptions) every problem is printed on a
    line of its own, then one line pointing to ``--help``, and the process exits 1:
    twistd would print its whole usage text before a UsageError's message, burying the
    one line that matters. Called from Python (tests, a launcher of one's own), it is a
    UsageError with the same text.
    """
    problems = getattr(exc, "problems", None) or str(exc).splitlines() or [repr(exc)]
    if getattr(options, "parent", None) is None:
        raise usage.UsageError("\n".join(problems)) from exc
    sys.stderr.writelines(f"twistd qpconn: error: {problem}\n" for problem in problems)
    sys.stderr.write("twistd qpconn: see 'twistd qpconn --help' for the options\n")
    sys.stderr.flush()
    raise SystemExit(1)


def build_service(options: Options) -> IService:
    """The service the (checked) options describe: listeners, plugins, reload, metrics.

    With ``--workers`` the single-process service is built first all the same, so that a
    plugin that cannot load stops this process now instead of N workers later.
    """
    top = make_service(
        options["listen"],
        options["config"],
        hostname=options["hostname"],
        lookups=options["lookups"],
        proxy=options["proxy"],
        tls_cert=options["tls-cert"],
        tls_key=options["tls-key"],
    )
    if options["workers"] is not None:
        return prefork_service(options)
    add_operations(top, options["metrics"], tracing=bool(options["tracing"]))
    return top


def prefork_service(options: Options) -> IService:
    """``--workers N``: the parent of N worker processes (qpconn.app.prefork).

    The single-process service was built first only to validate the config and the
    endpoints (a mistake is a usage error here, not N crashing workers); it is dropped.
    """
    from qpconn.app.prefork import PreforkService, worker_spec

    spec = worker_spec(
        options["config"],
        options["hostname"],
        lookup_settings(options),
        proxy_settings(options),
        options["tls-cert"],
        options["tls-key"],
        tracing=bool(options["tracing"]),
    )
    return PreforkService(options["listen"], spec, options["workers"], options["metrics"])


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address, as (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError("no host")
    if port and not port.isdigit():
        raise ValueError("port must be a number")
    number = int(port) if port else default_port
    if not 0 < number < 65536:
        raise ValueError("port out of range")
    return host, number


def lookup_settings(options: Options) -> LookupSettings:
    """The peer lookups the options ask for (timeouts come from the config directory)."""
    return LookupSettings(
        rdns=not options["no-rdns"],
        dns_servers=list(options["dns-server"]) or None,
        ident=bool(options["ident"]),
        ident_port=options["ident-port"],
    )


def proxy_settings(options: Options) -> ProxySettings:
    """The PROXY protocol policy the options ask for.

    ``--proxy-from`` alone turns the requirement on: naming trusted balancers means the
    listener sits behind them. ``--proxy-protocol`` alone trusts loopback only.
    """
    trusted = list(options["proxy-from"])
    enabled = bool(options["proxy-protocol"]) or bool(trusted)
    return ProxySettings(enabled=enabled, trusted=trusted) if trusted else ProxySettings(enabled)


def makeService(options: Options) -> IService:
    """The service of the parsed (and checked) options: :func:`build_service`.

    A plugin that cannot load (or any other problem only building finds) stops the
    start as a bad setting does (:func:`config_failure`). Under twistd the service comes
    wrapped so that twistd's text log (when no ``--logger`` or ``--syslog`` is given) is
    written by qpconn's cheaper observer (qpconn.log.twistd).
    """
    parent = getattr(options, "parent", None)
    try:
        top = build_service(options)
    except (ConfigError, PluginLoadError, ValueError, OSError) as exc:
        if parent is None:
            raise
        config_failure(options, exc)
    if parent is None:
        return top
    from qpconn.log.twistd import DefaultTextLog

    return DefaultTextLog(top, parent)
