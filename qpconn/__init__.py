"""qpconn: an SMTP server framework on Twisted, in the tradition of qpsmtpd and Haraka.

The names most plugin authors need are importable from here. The package's layers:
``core`` (sans-I/O SMTP), ``smtp`` (command handlers), ``hooks`` (plugins, runner, results),
``mail`` (what plugins see), ``server`` (the Twisted adapter), ``app`` (twistd, service,
workers, reload, check), ``log``, ``kit`` (helpers for plugin authors), ``plugins`` (the
shipped ones), ``client`` (forwarding) and ``testing``.
"""

from qpconn import moved
from qpconn.hooks.plugin import Plugin
from qpconn.hooks.results import (
    DECLINED,
    DENY,
    DENY_DISCONNECT,
    DENYSOFT,
    DENYSOFT_DISCONNECT,
    DONE,
    OK,
    Result,
)
from qpconn.mail.address import Address
from qpconn.mail.connection import Connection
from qpconn.mail.transaction import Transaction

__version__ = "0.1.0"

moved.install()  # qpconn.results, qpconn.address ... still import (see qpconn.moved)

__all__ = [
    "Address",
    "Connection",
    "Plugin",
    "Transaction",
    "DECLINED",
    "DENY",
    "DENY_DISCONNECT",
    "DENYSOFT",
    "DENYSOFT_DISCONNECT",
    "DONE",
    "OK",
    "Result",
    "__version__",
]
