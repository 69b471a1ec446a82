"""qpconn from a .tac file: the service ``twistd qpconn`` builds, assembled in Python.

Run it with::

    twistd -n -y docs/examples/qpconn.tac

Settings come from the environment, each with the same default as ``twistd qpconn``:

QPCONN_LISTEN    endpoint strings separated by spaces   [tcp:2525:interface=127.0.0.1]
QPCONN_CONFIG    config directory                       [none: built-in defaults]
QPCONN_HOSTNAME  this server's name (overrides ``me``)  [config ``me``, else the FQDN]
QPCONN_MAILDIR   Maildir for the built-in plugin list   [./maildir]
QPCONN_COMMANDS  "module:Class" of an SMTPCommands subclass  [qpconn's own handlers]

QPCONN_MAILDIR applies only without QPCONN_CONFIG: a config directory's ``plugins`` file
names its own queue plugin.
"""

import importlib
import os

from twisted.application import service

from qpconn.config import DEFAULT_PLUGINS, Config
from qpconn.plugins import load_plugin
from qpconn.app.service import DEFAULT_LISTEN, make_service

listen = os.environ.get("QPCONN_LISTEN", DEFAULT_LISTEN).split()
config_dir = os.environ.get("QPCONN_CONFIG") or None
hostname = os.environ.get("QPCONN_HOSTNAME") or None

plugins = None  # None: the config directory's plugins file (or the built-in list)
if config_dir is None:
    # The built-in plugin list with the queue line pointing at our Maildir. Plugins read
    # their settings in register(), so they get a Config with the same hostname override.
    config = Config(None, {"me": hostname} if hostname else None)
    maildir = os.environ.get("QPCONN_MAILDIR", "./maildir")
    plugins = [
        load_plugin(config, *line.split())
        for line in DEFAULT_PLUGINS
        if not line.startswith("queue/")
    ]
    plugins.append(load_plugin(config, "queue/maildir", maildir))

commands = None  # None: qpconn's own command handlers
if os.environ.get("QPCONN_COMMANDS"):
    module_name, _, class_name = os.environ["QPCONN_COMMANDS"].partition(":")
    commands = getattr(importlib.import_module(module_name), class_name)

# twistd looks for a variable named "application".
application = service.Application("qpconn")
make_service(
    listen, config_dir, hostname=hostname, plugins=plugins, commands=commands
).setServiceParent(application)
