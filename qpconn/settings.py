"""Every setting file the server reads, and the one validator they all go through.

The table :data:`SETTINGS` names each file of the config directory that qpconn or a
shipped plugin reads, with its type, its range and its default. :func:`validate` checks
a :class:`~qpconn.config.Config` against it. The server factory runs it before it reads
any setting, so ``python -m qpconn check``, ``twistd qpconn`` (its options) and a SIGHUP
reload refuse exactly the same directories, and a value that passes cannot make the
start-up or a session fail later (a negative timeout once reached Twisted's
``callLater`` as an AssertionError in every session).

Errors name the file, the line and the value; all of them are reported at once, so one
run of ``check`` shows everything to fix. Warnings are for what works but is probably
not what the administrator meant: a file nobody reads (with the near name it may be a
typo of), a plugin's file without that plugin, no plugin to queue the mail
(:func:`plugin_warnings`, which needs the loaded plugins).

The readers (the factory, :mod:`qpconn.smtp.limits`, ...) keep their own parsing; this table
is what they are checked against, and ``tests/test_settings.py`` keeps the two, and
docs/config.md, in agreement.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.logger import Logger

from qpconn.config import ConfigError
from qpconn.server.tlscontext import DEFAULT_CIPHERS, DEFAULT_SESSION_TIMEOUT, MIN_VERSIONS

if TYPE_CHECKING:
    from qpconn.config import Config
    from qpconn.plugins import Plugin

__all__ = [
    "Setting",
    "SETTINGS",
    "ConfigErrors",
    "validate",
    "plugin_warnings",
    "log_warnings",
]

log = Logger(namespace="qpconn.config")

#: The upper bound of every setting in seconds: longer is a typo, not a policy.
DAY = 86400.0

_YES_NO = ("1", "0", "yes", "no", "true", "false", "on", "off")
_LOG_LEVELS = ("debug", "info", "warn", "warning", "error", "critical")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Setting:
    """One setting file: what its value must be, and who reads it.

    ``kind`` is one of ``count`` (a whole number from ``minimum``), ``seconds`` (a number
    from ``minimum``, above it when ``exclusive``, at most ``maximum``), ``choice``
    (one of ``choices``, any case), ``domain`` (a host name or address literal),
    ``text`` (one line of printable text), ``file`` / ``directory`` (a path that must
    exist), ``networks`` (addresses, networks and prefixes, every line), ``list`` (every
    line, checked by the plugin that reads it) and ``path`` (checked by its plugin).
    ``default`` is the value used without the file, as docs/config.md gives it (None:
    unset). ``plugin`` is the shipped plugin that reads it; None: the server does.
    """

    name: str
    kind: str
    default: str | None = None
    minimum: float = 0
    exclusive: bool = False
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    plugin: str | None = None

    @property
    def many(self) -> bool:
        """A list setting takes every line; the others only the first."""
        return self.kind in ("list", "networks")


def _seconds(name: str, default: str | None, *, above_zero: bool = False) -> Setting:
    return Setting(name, "seconds", default, 0, above_zero, DAY)


_TABLE = (
    Setting("plugins", "list"),
    Setting("me", "domain"),
    Setting("rcpthosts", "list", "localhost", plugin="rcpt_ok"),
    Setting("morercpthosts", "list", plugin="rcpt_ok"),
    Setting("allow_untrusted_routing", "choice", "0", choices=_YES_NO, plugin="rcpt_ok"),
    # read by the relay plugin, and by the server for the connection limits' exceptions
    Setting("relayclients", "networks", plugin="relay"),
    Setting("morerelayclients", "networks", plugin="relay"),
    Setting("databytes", "count", "52428800"),
    _seconds("timeout", "300", above_zero=True),
    Setting("smtpgreeting", "text"),
    _seconds("plugin_timeout", "30"),
    Setting("loglevel", "choice", "debug", choices=_LOG_LEVELS),
    Setting("size_threshold", "count", "1048576"),
    Setting("spool_dir", "directory"),
    _seconds("shutdown_timeout", "30"),
    _seconds("dns_timeout", "5", above_zero=True),
    _seconds("ident_timeout", "3", above_zero=True),
    _seconds("proxy_timeout", "5", above_zero=True),
    Setting("max_rcpt", "count", "100"),
    Setting("max_errors", "count", "20"),
    _seconds("data_timeout", None),
    Setting("max_connections", "count", "0"),
    Setting("max_connections_per_ip", "count", "50"),
    Setting("max_connection_rate", "count", "60"),
    _seconds("connection_rate_window", "60", above_zero=True),
    Setting("connection_limit_exceptions", "networks"),
    # the front proxies that may use XCLIENT (qpconn.smtp.xclient)
    Setting("xclient_hosts", "networks"),
    Setting("bare_newline", "choice", "reject", choices=("reject", "normalize")),
    # read by qpconn.smtp.limits, applied by qpconn.server.deadlines
    _seconds("command_deadline", None),
    Setting("min_data_rate", "count", "500"),
    _seconds("data_rate_grace", None),
    _seconds("max_session_time", "3600"),
    Setting("smtputf8", "choice", "yes", choices=_YES_NO),
    Setting("tls_cert", "file"),
    Setting("tls_key", "file"),
    Setting("tls_required", "choice", "0", choices=_YES_NO),
    Setting("tls_before_auth", "choice", "1", choices=_YES_NO),
    # read by qpconn.server.tlscontext, whose scratch context lets OpenSSL judge them
    Setting("tls_min_version", "choice", "TLSv1.2", choices=MIN_VERSIONS),
    Setting("tls_ciphers", "text", DEFAULT_CIPHERS),
    Setting("tls_ciphersuites", "text"),
    Setting("tls_session_timeout", "count", str(DEFAULT_SESSION_TIMEOUT)),
    Setting("tls_dhparams", "file"),
    Setting("auth_max_failures", "count", "3"),
    Setting("flat_auth_pw", "list", plugin="auth/flat_file"),
    Setting("badhelo", "list", plugin="helo"),
    Setting("badmailfrom", "list", plugin="badmailfrom"),
    Setting("badrcptto", "list", plugin="badrcptto"),
    Setting("dnsbl_zones", "list", plugin="dnsbl"),
    Setting("dnsbl_allow", "list", plugin="dnsbl"),
    Setting("rhsbl_zones", "list", plugin="rhsbl"),
    Setting("hosts_allow", "list", plugin="hosts_allow"),
    Setting("karma_db", "path", plugin="karma"),
    Setting("public_suffix_list", "path", plugin="dmarc"),
    Setting(
        "milter_default_action", "choice", "tempfail", choices=("tempfail", "accept"),
        plugin="milter",
    ),
    Setting("milter_connect_timeout", "seconds", "30", 0, True, DAY, plugin="milter"),
    Setting("milter_command_timeout", "seconds", "30", 0, True, DAY, plugin="milter"),
    Setting("milter_content_timeout", "seconds", "300", 0, True, DAY, plugin="milter"),
)

#: Every setting file, by name.
SETTINGS: dict[str, Setting] = {setting.name: setting for setting in _TABLE}


class ConfigErrors(ConfigError):
    """Every problem of a directory at once; ``str()`` gives one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def validate(config: Config, *, load_tls: bool = True) -> list[str]:
    """Check every setting of ``config``; the warnings, or ConfigErrors with every error.

    Only what can be judged without the plugins: :func:`plugin_warnings` adds the rest.
    ``load_tls=False`` leaves loading the certificate to the caller (the factory does it
    right after, with the same messages).
    """
    problems: list[str] = []
    warnings: list[str] = []
    for setting in _TABLE:
        try:
            values = config.lines(setting.name)
        except ConfigError as exc:  # not UTF-8: the message names the file and line
            problems.append(str(exc))
            continue
        if not values or setting.kind in ("list", "path") or not config.is_set(setting.name):
            continue  # defaults are right by construction (``me``: the machine's name)
        if not setting.many and len(values) > 1:
            warnings.append(
                f"{setting.name}: only the first value is used, {values[1]!r} "
                f"({config.where(setting.name, 1)}) is ignored"
            )
        checked = values if setting.many else values[:1]
        for index, value in enumerate(checked):
            problem = _check(setting, value, config)
            if problem is not None:
                where = config.where(setting.name, index)
                problems.append(f"{setting.name}: {value!r} {problem} ({where})")
            elif setting.kind == "text" and not value.isascii():
                warnings.append(
                    f"{setting.name}: {value!r} is not ASCII; RFC 5321 replies are ASCII "
                    f"({config.where(setting.name, index)})"
                )
    if load_tls:
        problems.extend(_check_tls(config, problems))
    if problems:
        raise ConfigErrors(problems)
    return warnings


def _check(setting: Setting, value: str, config: Config) -> str | None:
    """What is wrong with one value of a setting, or None."""
    kind = setting.kind
    if kind == "count":
        try:
            number: float = int(value)
        except ValueError:
            return "is not a whole number"
        return _in_range(setting, number)
    if kind == "seconds":
        try:
            number = float(value)
        except ValueError:
            return "is not a number"
        if not math.isfinite(number):
            return "is not a finite number"
        return _in_range(setting, number)
    if kind == "choice":
        if value.lower() not in {choice.lower() for choice in setting.choices}:
            return f"is not one of {', '.join(setting.choices)}"
        return None
    if kind == "domain":
        return _domain_problem(value)
    if kind == "text":
        return "holds a control character" if _CONTROL.search(value) else None
    if kind == "networks":
        return _network_problem(value)
    if kind == "file":
        path = config.path(value)
        if not os.path.isfile(path):
            return f"is not a file ({path} does not exist or is not a regular file)"
        if not os.access(path, os.R_OK):
            return f"cannot be read by this process ({path})"
        return None
    if kind == "directory":
        path = config.path(value)
        if not os.path.isdir(path):
            return f"is not a directory ({path})"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"is not writable by this process ({path})"
        return None
    raise AssertionError(f"setting {setting.name}: unknown kind {kind!r}")


def _in_range(setting: Setting, number: float) -> str | None:
    if number < 0 <= setting.minimum:
        return "is negative"
    if setting.exclusive and number <= setting.minimum:
        return f"must be more than {setting.minimum:g}"
    if number < setting.minimum:
        return f"is less than {setting.minimum:g}"
    if setting.maximum is not None and number > setting.maximum:
        return f"is more than {setting.maximum:g} (a day)"
    return None


def _domain_problem(value: str) -> str | None:
    """``me``: a domain name of letters, digits and hyphens, or an address literal."""
    if value.startswith("[") and value.endswith("]"):
        import ipaddress

        literal = value[1:-1]
        try:
            ipaddress.ip_address(literal.removeprefix("IPv6:"))
        except ValueError:
            return "is not an address literal such as [192.0.2.1]"
        return None
    if not value.isascii():
        try:
            ascii_form = value.encode("idna").decode("ascii")
        except UnicodeError:
            return "is not a domain name"
        return f"is not ASCII; write the A-label form {ascii_form!r}"
    name = value[:-1] if value.endswith(".") else value
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        return "is not a domain name such as mx.example.com"
    return None


def _network_problem(value: str) -> str | None:
    from qpconn.kit.policy import NetworkList

    try:
        NetworkList("-", [value])
    except ValueError:
        return "is not an address, network or prefix (192.0.2.7, 10.0.0.0/8, 192.168.)"
    return None


def _check_tls(config: Config, problems: list[str]) -> list[str]:
    """The certificate and key load and fit each other: the factory loads them again,
    but options parsing (``twistd qpconn``) must refuse a bad pair before it builds."""
    if any(p.startswith(("tls_cert:", "tls_key:")) for p in problems):
        return []
    from qpconn.server.tls import tls_from_config

    try:
        tls_from_config(config)
    except (ConfigError, OSError, ValueError) as exc:
        return [str(exc)]
    return []


# -- warnings that need the plugins -------------------------------------------------------
def plugin_warnings(config: Config, plugins: Sequence[Plugin], queue_hooks: int) -> list[str]:
    """What works but is probably a mistake, given the loaded ``plugins``.

    ``queue_hooks`` is how many plugins answer the ``queue`` hook (the hook runner
    knows). A file is known when it is in :data:`SETTINGS`, in a loaded plugin's
    ``config_files``, or named by a plugin argument (``auth/flat_file users``).
    """
    warnings: list[str] = []
    if queue_hooks == 0:
        warnings.append(
            "plugins: no plugin answers the queue hook, so every message gets "
            "451 4.3.0 and none is stored (add queue/maildir, queue/smtp_forward, ...)"
        )
    loaded = {_shipped_name(plugin) for plugin in plugins}
    declared = {name for plugin in plugins for name in getattr(plugin, "config_files", ())}
    named = _files_named_by_arguments(config, plugins)
    for name in config.file_names():
        if name.startswith(".") or name in declared or name in named:
            continue
        setting = SETTINGS.get(name)
        if setting is None:
            close = difflib.get_close_matches(name, list(SETTINGS) + sorted(declared), 1, 0.75)
            hint = f"; did you mean {close[0]}?" if close else ""
            warnings.append(f"{name}: no setting of that name, the file is not read{hint}")
        elif setting.plugin is not None and setting.plugin not in loaded:
            if name in ("relayclients", "morerelayclients"):
                warnings.append(
                    f"{name}: the relay plugin is not in plugins, so these clients may not "
                    "relay (they are only exempt from the connection limits)"
                )
            else:
                warnings.append(
                    f"{name}: only the {setting.plugin} plugin reads this file, "
                    "and it is not in plugins"
                )
    return warnings


def _shipped_name(plugin: Plugin) -> str | None:
    """``queue/maildir`` for an instance of a shipped plugin (or of a subclass of one)."""
    for cls in type(plugin).__mro__:
        module = cls.__module__
        if module.startswith("qpconn.plugins.") and cls.__name__ != "Plugin":
            return module.removeprefix("qpconn.plugins.").replace(".", "/")
    return None


def _files_named_by_arguments(config: Config, plugins: Sequence[Plugin]) -> set[str]:
    """Files of the directory that a plugin argument names (``path`` or ``key=path``)."""
    if config.directory is None:
        return set()
    directory = os.path.realpath(config.directory)
    found: set[str] = set()
    for plugin in plugins:
        for argument in plugin.args:
            value = argument.split("=", 1)[-1]
            for candidate in (config.path(value), os.path.join(directory, value)):
                real = os.path.realpath(candidate)
                if os.path.dirname(real) == directory:
                    found.add(os.path.basename(real))
    return found


def log_warnings(warnings: Sequence[str], config_dir: str | None) -> None:
    """One warning line per finding (start-up and SIGHUP reload alike); ``check`` prints
    the same findings on stderr."""
    for warning in warnings:
        log.warn("config: {warning}", warning=warning, config_dir=config_dir)
