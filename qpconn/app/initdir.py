"""``python -m qpconn init DIR``: write a working, commented config directory.

What it writes is the built-in default made explicit (the server without ``--config``
behaves the same), so an administrator starts from files that say what each setting
does instead of from an empty directory: the ``plugins`` list, ``me``, ``rcpthosts``,
the limits with their defaults, and the Maildir as an absolute path (``./maildir``
would follow the directory twistd happens to be started from).

A limit's file holds its default value, with the default repeated in a comment: a file
whose lines are all comments is an empty setting, which for some limits means "none"
(an empty ``databytes`` is no size limit), not the default. The values come from the
validator's table (:data:`qpconn.settings.SETTINGS`), so they are the defaults the server
uses; ``tests/test_ops_cli.py`` checks that the directory builds the same server as no
directory at all and that ``check`` finds nothing to warn about.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from qpconn.config import default_hostname
from qpconn.settings import SETTINGS

__all__ = ["LIMITS", "files_for", "main"]

#: the limits written, with what each file is for (the default comes from SETTINGS)
LIMITS = {
    "databytes": "the largest message accepted, in bytes, announced as SIZE in EHLO; 0: none",
    "timeout": "seconds a client may stay silent before the server closes the connection",
    "plugin_timeout": "seconds a plugin's hook may take before the command gets 451",
    "max_rcpt": "recipients per message; the next one gets 452 (0: no limit)",
    "max_errors": "refused commands per connection before it is closed with 421 (0: no limit)",
    "max_connections": "connections at once for the whole server (0: no limit)",
    "max_connections_per_ip": "connections at once from one address (0: no limit)",
    "max_connection_rate": "connections per connection_rate_window from one address (0: no limit)",
    "connection_rate_window": "seconds over which max_connection_rate counts",
}


def _plugins_text(maildir: str) -> str:
    return (
        "# The plugins, one per line with its arguments, in the order their hooks run.\n"
        "# python -m qpconn plugins lists the others; python -m qpconn help NAME tells more.\n"
        "#\n"
        "# relay: clients listed in relayclients may send mail anywhere.\n"
        "relay\n"
        "# count_unrecognized_commands: close the connection after 4 unknown commands.\n"
        "count_unrecognized_commands 4\n"
        "# rcpt_ok: accept mail for me and rcpthosts, refuse relaying for everyone else.\n"
        "rcpt_ok\n"
        "# queue/maildir: store accepted mail in this Maildir (LF line endings) before the 250.\n"
        f"queue/maildir {maildir}\n"
    )


def files_for(hostname: str, maildir: str) -> dict[str, str]:
    """The files ``init`` writes, by name, for a server called ``hostname``."""
    files = {
        "plugins": _plugins_text(maildir),
        "me": (
            "# The name this server gives itself: greeting, EHLO reply, Received fields.\n"
            "# It is also a local domain (rcpt_ok accepts mail for it).\n"
            f"{hostname}\n"
        ),
        "rcpthosts": (
            "# The domains mail is accepted for (besides me), one per line;\n"
            "# a line starting with a dot covers the subdomains (.example.com).\n"
            f"{SETTINGS['rcpthosts'].default}\n"
        ),
        "relayclients": (
            "# Clients that may relay (send mail to any domain): addresses, networks\n"
            "# (192.0.2.0/24) or prefixes (192.168.), one per line. None by default.\n"
            "# 127.0.0.1\n"
        ),
    }
    for name, purpose in LIMITS.items():
        default = SETTINGS[name].default
        files[name] = f"# {name}: {purpose}.\n# Default: {default}\n{default}\n"
    return files


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """The ``init`` command: 0 once written, 1 when a file is there already (nothing written)."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(
        prog="python -m qpconn init",
        description="Write a working, commented config directory: the built-in defaults made "
        "explicit. Then: twistd -n qpconn --config DIR; python -m qpconn check --config DIR.",
    )
    parser.add_argument("directory", help="the config directory (created if missing)")
    parser.add_argument("--hostname", default=None, help="the server's name (default: this host's)")
    parser.add_argument(
        "--maildir",
        default="maildir",
        help="where mail is stored; made absolute (default: ./maildir from here)",
    )
    args = parser.parse_args(argv)
    files = files_for(args.hostname or default_hostname(), os.path.abspath(args.maildir))
    present = [name for name in files if os.path.lexists(os.path.join(args.directory, name))]
    if present:
        err.write(
            f"error: {args.directory} already has {', '.join(present)}; nothing written "
            "(init only writes a new directory)\n"
        )
        return 1
    os.makedirs(args.directory, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(args.directory, name), "x", encoding="utf-8") as handle:
            handle.write(text)
    out.write(f"wrote {len(files)} files to {args.directory}: {', '.join(files)}\n")
    out.write(f"next: python -m qpconn check --config {args.directory}\n")
    return 0
