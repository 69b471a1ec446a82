"""``python -m qpconn COMMAND``: administration commands (the server is ``twistd qpconn``)."""

from __future__ import annotations

import sys

COMMANDS = {"check": "validate a config directory and list the plugins of every hook"}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command; usage and exit status 2 for anything else."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "check":
        from qpconn.app.check import main as check

        return check(args[1:])
    sys.stderr.write("usage: python -m qpconn COMMAND [options]\n\ncommands:\n")
    for name, text in COMMANDS.items():
        sys.stderr.write(f"  {name:8} {text}\n")
    return 0 if args[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
