"""``python -m qpconn check --config DIR``: validate a config directory before using it.

The check builds exactly what the server builds at start-up (the settings, every plugin
with its arguments, the hook table) without listening or touching the network, so an
administrator learns about a typo before a restart or a reload, not after. It prints,
for each hook, the plugins that will run there in order, as ``haraka -o`` does, and the
validator's warnings (:mod:`qpconn.settings`: files nobody reads, a plugin's file
without the plugin, no queue plugin) on stderr; they do not make the check fail.

:func:`build` is shared with the SIGHUP reload (:mod:`qpconn.app.reload`): a directory that
passes the check is a directory a reload accepts, and the other way round.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TextIO

from qpconn.config import Config, ConfigError
from qpconn.hooks.plugin import HOOKS, Plugin, PluginLoadError, load_plugins
from qpconn.hooks.runner import HookRunner
from qpconn.server.peerinfo import LookupSettings
from qpconn.settings import ConfigErrors, plugin_warnings

__all__ = ["Built", "CheckError", "build", "report", "main"]


#: The probe asks nobody: a named server (never queried) keeps the resolver from
#: watching resolv.conf, which would leave a timer behind in a running reactor.
_NO_LOOKUPS = LookupSettings(rdns=False, dns_servers=[("127.0.0.1", 53)])


class CheckError(Exception):
    """The directory cannot be used; the message says which file and why.

    ``problems`` holds every problem found (one line each); the message joins them.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


@dataclass
class Built:
    """A validated configuration: the settings, the plugins and their hook table.

    ``probe`` is a server factory built from the settings with no plugins: its
    attributes (``timeout``, ``databytes``, ``session_limits``...) are the values a
    server would use.
    """

    config: Config
    plugins: list[Plugin]
    runner: HookRunner
    probe: object
    #: what works but is probably a mistake (qpconn.settings); shown, never fatal
    warnings: list[str] = field(default_factory=list)


def build(
    config_dir: str | None,
    hostname: str | None = None,
    clock: object = None,
    overrides: dict[str, list[str]] | None = None,
) -> Built:
    """Everything the server would build from ``config_dir``; CheckError when it can't.

    ``overrides`` are settings given on the command line (they win over files).
    """
    from qpconn.server.factory import SMTPFactory

    settings: dict[str, list[str]] = dict(overrides or {})
    if hostname:
        settings["me"] = [hostname]
    try:
        config = Config(config_dir, settings)
        config.freeze()  # the set in use is the directory as it is now (see Config.freeze)
        # The factory reads and checks every server-wide setting; with no plugins it
        # neither loads nor attaches any, so nothing runs that could have side effects.
        probe = SMTPFactory(config, [], clock=clock, lookups=_NO_LOOKUPS)  # type: ignore[arg-type]
        plugins = load_plugins(config)
        runner = HookRunner(plugins, probe.clock, probe.runner.timeout)
    except ConfigErrors as exc:
        raise CheckError(str(exc), exc.problems) from exc
    except (ConfigError, PluginLoadError, ValueError, OSError) as exc:
        raise CheckError(str(exc)) from exc
    warnings = probe.config_warnings + plugin_warnings(
        config, plugins, len(runner.plugins_for("queue"))
    )
    return Built(config, plugins, runner, probe, warnings)


def _label(plugin: Plugin) -> str:
    return " ".join([plugin.name, *plugin.args])


def report(built: Built, out: TextIO) -> None:
    """The plugin list and, for each hook some plugin implements, who runs there in order."""
    config = built.config
    out.write(f"config: {config.directory or '(built-in defaults)'}\n")
    out.write(f"me: {config.me}\n")
    out.write("plugins:\n")
    for number, plugin in enumerate(built.plugins, 1):
        out.write(f"  {number}. {_label(plugin)}\n")
    out.write("hooks:\n")
    for hook in HOOKS:
        names = [plugin.name for plugin in built.runner.plugins_for(hook)]
        if names:
            out.write(f"  {hook}: {', '.join(names)}\n")


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """The ``check`` command; 0 when the directory is usable, 1 (with the reason) when not."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(
        prog="python -m qpconn check",
        description="Validate a config directory and list the plugins each hook runs.",
    )
    parser.add_argument("--config", "-c", default=None, help="config directory (default: none)")
    parser.add_argument("--hostname", default=None, help="as twistd qpconn --hostname")
    args = parser.parse_args(argv)
    try:
        built = build(args.config, args.hostname)
    except CheckError as exc:
        err.writelines(f"error: {problem}\n" for problem in exc.problems)
        return 1
    err.writelines(f"warning: {warning}\n" for warning in built.warnings)
    report(built, out)
    out.write("OK\n")
    return 0
