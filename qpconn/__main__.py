"""``python -m qpconn COMMAND``: administration commands (the server is ``twistd qpconn``).

As Haraka's ``haraka -i``, ``-o``, ``-l``, ``-h PLUGIN`` and its test harness: write a
config directory, check it, list the plugins, read one's documentation, and try the
configured plugins on a message, all without starting a server.
"""

from __future__ import annotations

import importlib
import sys

#: name -> (module:function, one line for the usage text)
COMMANDS = {
    "init": ("qpconn.app.initdir:main", "write a working, commented config directory"),
    "check": ("qpconn.app.check:main", "validate a config directory and list each hook's plugins"),
    "plugins": (
        "qpconn.app.catalogue:plugins_main",
        "list the plugins with their purpose and hooks",
    ),
    "help": ("qpconn.app.catalogue:help_main", "print a plugin's documentation (help PLUGIN)"),
    "test": ("qpconn.app.dryrun:main", "run the configured plugins over a message, offline"),
}

USAGE = """usage: python -m qpconn COMMAND [options]   (python -m qpconn COMMAND --help for each)

The server itself is twistd qpconn (twistd qpconn --help).

commands:
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command; the usage (exit status 2) for anything else."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in COMMANDS:
        module_name, _, function = COMMANDS[args[0]][0].partition(":")
        command = getattr(importlib.import_module(module_name), function)
        return int(command(args[1:]))
    asked = args[:1] in (["-h"], ["--help"])
    stream = sys.stdout if asked else sys.stderr
    stream.write(USAGE)
    for name, (_, text) in COMMANDS.items():
        stream.write(f"  {name:8} {text}\n")
    if args and not asked:
        stream.write(f"\nunknown command {args[0]!r}\n")
    return 0 if asked else 2


if __name__ == "__main__":
    sys.exit(main())
