"""``python -m qpconn test``: run the configured plugins over one message, offline.

An administrator asks "what would my server say to this client and this message?"
without a second server or a real client: the command builds the directory exactly as
``check`` does (so it refuses what ``check`` refuses), then plays one SMTP session
through :class:`qpconn.testing.Harness`, which drives the real protocol class over an
in-memory transport. Each plugin's verdict is printed as the hook runner sees it
(plugin, hook, result, message), with the dialogue and the final reply.

Offline means: nothing leaves the machine and nothing is delivered. DNS answers every
question NXDOMAIN unless ``--dns`` gives an answer; time is a fake clock (a plugin that
waits on a timer goes on at once). The ``queue`` hook of the configured plugins does
not run unless ``--queue`` is given: a stand-in answers ``250`` without storing, and the
output says which plugins were held back. Plugins that keep state (greylisting, karma)
record the session as they would a real one. A plugin whose hook waits on a worker
thread that calls back into the reactor (SPF, DKIM, the spamd and clamd clients) cannot
finish without a running reactor: it overruns its timeout on the fake clock and the
command gets 451, which its verdict shows as an error; try those on a running server.
The server's log lines (info and above) are shown with the exchange that caused them.
"""

from __future__ import annotations

import argparse
import email.utils
import sys
from typing import Any, TextIO

from twisted.logger import LogLevel, formatEvent, globalLogBeginner

from qpconn.core.reply import Reply
from qpconn.hooks.plugin import Plugin
from qpconn.hooks.results import OK, HookOutcome

__all__ = ["main", "WithoutQueue", "TestQueue", "dialogue"]


class TestQueue(Plugin):
    """Answers the queue hook in place of the held-back queue plugins: accepts, keeps nothing."""

    def hook_queue(self, transaction: Any) -> Any:
        return OK, f"2.0.0 test run: would be queued as {transaction.id}, nothing stored"


class WithoutQueue(Plugin):
    """A loaded plugin with every hook but ``queue``: its other verdicts still count.

    Not instantiated through :meth:`Plugin.__init__`: it stands for a plugin already
    made (and checked) by the same loader the server uses.
    """

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.name = plugin.name
        self.args = plugin.args
        self.config = plugin.config
        self.log = plugin.log
        self.timeout = plugin.timeout
        self._extra_hooks = []

    def hooks(self) -> list[tuple[str, Any]]:
        return [(hook, function) for hook, function in self.plugin.hooks() if hook != "queue"]

    def attach(self, server: Any) -> None:
        super().attach(server)
        self.plugin.attach(server)


def default_message(sender: str, recipients: list[str]) -> bytes:
    """A small, well-formed message, for a run without FILE."""
    return (
        f"From: <{sender}>\r\nTo: {', '.join(f'<{r}>' for r in recipients)}\r\n"
        f"Subject: qpconn test\r\nDate: {email.utils.formatdate()}\r\n"
        f"Message-ID: {email.utils.make_msgid('qpconn-test')}\r\n\r\n"
        "A test message from python -m qpconn test.\r\n"
    ).encode()


def dot_stuffed(message: bytes) -> bytes:
    """``message`` as DATA carries it: CRLF lines, leading dots doubled, the end marker."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


def _describe(item: str | bytes | None) -> str:
    if item is None:
        return "(connect)"
    if isinstance(item, bytes):
        return f"(message, {len(item)} bytes)"
    return item


def _format_reply(reply: Reply) -> list[str]:
    lines = reply.to_bytes().decode("utf-8", "replace").rstrip("\r\n").split("\r\n")
    return lines


def verdict_line(hook: str, plugin: str, outcome: HookOutcome) -> str:
    """One hook's verdict as the dialogue shows it: hook, plugin, result, message."""
    message = f" {outcome.message}" if outcome.message else ""
    result = "error (the plugin failed: 451)" if outcome.error else outcome.result.name
    return f"   hook {hook}: {plugin} {result}{message}"


def log_line(event: dict[str, Any]) -> str | None:
    """A server log event as the dialogue shows it (info and above), or None."""
    level = event.get("log_level")
    if level is None or level < LogLevel.info:
        return None
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += f": {failure.getErrorMessage() or failure.type.__name__}"
    return f"   log: {text}"


def dialogue(out: TextIO, pending: list[str]) -> Any:
    """A ``step`` watcher for :meth:`Harness.run`: prints each command, the verdicts and
    log lines it caused (``pending``) and the replies. It stops the script where a client
    would: after MAIL or DATA is refused."""

    def step(item: str | bytes | None, replies: list[Reply]) -> bool:
        out.write(f"C: {_describe(item)}\n")
        out.writelines(line + "\n" for line in pending)
        pending.clear()
        for reply in replies:
            out.writelines(f"S: {line}\n" for line in _format_reply(reply))
        last = replies[-1].code if replies else 0
        if isinstance(item, str) and item.startswith("MAIL") and last >= 400:
            return False
        return not (item == "DATA" and last != 354)

    return step


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """The ``test`` command: 0 when the message was accepted, 1 when not (or on an error)."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(
        prog="python -m qpconn test",
        description="Run the configured plugins over one message, offline, and print each "
        "hook's verdict and the final reply. Nothing is delivered unless --queue is given.",
    )
    parser.add_argument("--config", "-c", default=None, help="config directory")
    parser.add_argument("--ip", default="192.0.2.1", help="the client's address")
    parser.add_argument("--helo", default="client.example", help="the name given in EHLO")
    parser.add_argument(
        "--from",
        dest="sender",
        default="sender@example.org",
        help="the envelope sender ('' for the null sender)",
    )
    parser.add_argument(
        "--to",
        dest="recipients",
        action="append",
        default=None,
        help="a recipient (repeatable; default postmaster@ME)",
    )
    parser.add_argument(
        "--dns",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "TYPE", "VALUE"),
        help="a DNS answer (repeatable); every other name is NXDOMAIN",
    )
    parser.add_argument(
        "--queue", action="store_true", help="run the configured queue plugins too: really deliver"
    )
    parser.add_argument(
        "file",
        nargs="?",
        default=None,
        help="the message (- for standard input; default: a small one)",
    )
    args = parser.parse_args(argv)

    from qpconn.app.check import CheckError, build
    from qpconn.kit.threads import stop_pools
    from qpconn.testing import INLINE_POOLS, Harness

    try:
        built = build(args.config)
    except CheckError as exc:
        err.writelines(f"error: {problem}\n" for problem in exc.problems)
        return 1
    recipients = args.recipients or [f"postmaster@{built.config.me}"]
    if args.file == "-":
        message = sys.stdin.buffer.read()
    elif args.file:
        with open(args.file, "rb") as handle:
            message = handle.read()
    else:
        message = default_message(args.sender, recipients)

    plugins: list[Plugin] = list(built.plugins)
    if not args.queue:
        held = [p.name for p in plugins if any(hook == "queue" for hook, _ in p.hooks())]
        plugins = [WithoutQueue(p) if p.name in held else p for p in plugins]
        plugins.append(TestQueue(built.config, "(test queue)"))
        if held:
            out.write(f"queue hook of {', '.join(held)} held back (--queue delivers)\n")
    answers: dict[tuple[str, str], Any] = {}
    for name, rtype, value in args.dns:
        answers.setdefault((name, rtype.upper()), []).append(value)
    script: list[str | bytes] = [
        f"EHLO {args.helo}",
        f"MAIL FROM:<{args.sender}>",
        *(f"RCPT TO:<{rcpt}>" for rcpt in recipients),
        "DATA",
        dot_stuffed(message),
        "QUIT",
    ]
    pending: list[str] = []  # verdict and log lines, shown with the next exchange

    def keep_log(event: dict[str, Any]) -> None:
        line = log_line(event)
        if line is not None:
            pending.append(line)

    globalLogBeginner.beginLoggingTo([keep_log], redirectStandardIO=False)
    # Without a directory, the defaults (and this host's name, which Harness would not use).
    config: Any = args.config if args.config is not None else {"me": built.config.me}
    # queue/maildir's disk work needs no reactor: done in place, as greylisting's and karma's
    pools = (*INLINE_POOLS, "maildir")
    try:
        with Harness(
            plugins, config=config, dns_answers=answers, queue=False, inline_pools=pools
        ) as harness:
            harness.factory.runner.observer = lambda hook, plugin, _seconds, outcome: (
                pending.append(verdict_line(hook, plugin, outcome))
            )
            result = harness.run(script, remote_ip=args.ip, step=dialogue(out, pending))
    except RuntimeError as exc:  # a hook waits on something the fake clock cannot move
        err.write(f"error: the run stopped: {exc}\n")
        return 1
    finally:
        stop_pools()
    out.write("(closed)\n")
    out.writelines(line + "\n" for line in pending)  # disconnect hooks, the last log lines
    final, accepted = decision(result.replies)
    out.write(f"final reply: {' / '.join(_format_reply(final)) if final else '(none)'}\n")
    out.write("accepted\n" if accepted else "not accepted\n")
    return 0 if accepted else 1


def decision(replies: list[Reply]) -> tuple[Reply | None, bool]:
    """The reply that decided the message, and whether it was accepted.

    That is the reply to the end of data when DATA got 354; otherwise the last reply
    (the refusal that stopped the session: see :func:`dialogue`).
    """
    codes = [reply.code for reply in replies]
    if 354 in codes and codes.index(354) + 1 < len(replies):
        final = replies[codes.index(354) + 1]
        return final, 200 <= final.code < 300
    rest = [reply for reply in replies if reply.code != 221]
    return (rest[-1] if rest else None), False
