"""``twistd qpconn``: command-line options and the service they describe."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from qpconn.config import ConfigError
from qpconn.plugins import PluginLoadError
from qpconn.service import DEFAULT_LISTEN, make_service

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """Options of ``twistd qpconn``."""

    synopsis = "[--listen ENDPOINT ...] [--config DIR] [--hostname NAME]"
    longdesc = (
        "An SMTP server with qpsmtpd-style plugins. With no --config it accepts mail for "
        "localhost and this host's name and stores it in ./maildir."
    )
    optParameters = [
        ["config", "c", None, "qpsmtpd-style config directory (plugins, me, rcpthosts, ...)"],
        ["hostname", None, None, "name of this server (overrides the config file 'me')"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Twisted server endpoint string, repeatable [default: tcp:2525:interface=127.0.0.1]"""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]


def makeService(options: Options) -> IService:
    """Build the service; configuration errors stop twistd with a readable message."""
    try:
        return make_service(options["listen"], options["config"], hostname=options["hostname"])
    except (ConfigError, PluginLoadError) as exc:
        raise usage.UsageError(str(exc)) from exc
