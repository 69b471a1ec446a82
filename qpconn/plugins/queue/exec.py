"""queue/exec [option=value ...] COMMAND [ARG ...]: pipe each message to a local command.

For handing mail to an MTA's own injector (``sendmail -i -f %s -- %r``, ``exim -bm``) or
to a delivery script (not ``qmail-queue`` itself: it wants the envelope on descriptor 1,
which this plugin does not provide; use qmail's ``sendmail`` wrapper). The command is
run directly, never through a shell, so an address can never become shell syntax. In its arguments:

* ``%s`` is replaced by the envelope sender's address (empty for the null sender);
* ``%i`` by our queue id;
* an argument that is exactly ``%r`` becomes one argument per recipient address. Put
  ``--`` before it (as in the sendmail example) so that a recipient starting with ``-``
  can never be read as an option.

The environment also carries ``QPCONN_SENDER``, ``QPCONN_RECIPIENTS`` (space-separated)
and ``QPCONN_QUEUE_ID``. The message (our ``Received`` field, the header, the body) is
written to the command's standard input with Unix line endings (``crlf=yes`` keeps
CRLF), fed as the pipe drains, so a large spooled message never sits in memory.

The exit status is the verdict, and the client hears 250 only when the command said 0:

* 0 -> ``250 2.0.0 Queued as <id>``;
* a temporary-failure status (``tempfail=``, default 75, sysexits' EX_TEMPFAIL) -> 451;
* killed by a signal, not started, or still running after ``timeout=`` seconds (then
  it is killed) -> 451: nothing says the message was kept, so the client retries;
* any other status -> ``554 5.3.0``.

Whatever the command writes on stderr (and stdout) is logged, bounded, with the queue id.
The process runs under the reactor (``spawnProcess``): other sessions go on meanwhile.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from qpconn.client.stream import ChunkProducer, to_lf
from qpconn.hooks.results import DONE, OK, Result
from qpconn.plugins import Plugin

__all__ = ["Exec"]

#: how much of the command's output is kept for the log
MAX_OUTPUT = 4096
OPTIONS = ("timeout", "tempfail", "crlf")
_PLACEHOLDER = re.compile(r"%[si]")


class _Child(ProcessProtocol):
    """Collects the command's output and fires ``ended`` with its exit status or signal."""

    def __init__(self) -> None:
        self.ended: defer.Deferred[tuple[int | None, int | None]] = defer.Deferred()
        self.output = {1: b"", 2: b""}
        self.started: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.started.callback(None)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd in self.output and len(self.output[fd]) < MAX_OUTPUT:
            self.output[fd] = (self.output[fd] + data)[:MAX_OUTPUT]

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = getattr(value, "exitCode", None)
        signal = getattr(value, "signal", None)
        if isinstance(value, error.ProcessDone):
            code = 0
        self.ended.callback((code, signal))


class Exec(Plugin):
    """Queue plugin running a command per message; see the module docstring."""

    def register(self, *args: str) -> None:
        words = list(args)
        settings: dict[str, str] = {}
        while words and "=" in words[0] and words[0].split("=", 1)[0] in OPTIONS:
            key, _, value = words.pop(0).partition("=")
            settings[key] = value
        if not words:
            raise ValueError("expects a COMMAND, e.g. /usr/sbin/sendmail -i -f %s -- %r")
        program = words[0]
        found = program if os.sep in program else shutil.which(program)
        if found is None or not os.access(found, os.X_OK):
            raise ValueError(f"{program!r} is not an executable command")
        self.command = [found, *words[1:]]
        try:
            self.run_timeout = float(settings.get("timeout", "60"))
            self.tempfail = {int(v) for v in settings.get("tempfail", "75").split(",") if v}
        except ValueError as exc:
            raise ValueError(f"bad option value: {exc}") from None
        if self.run_timeout <= 0:
            raise ValueError("timeout must be positive")
        self.crlf = settings.get("crlf", "no").lower() in ("yes", "1", "true")
        # The hook runner's limit stays above ours, so the client gets our own 451.
        self.timeout = self.run_timeout + 5.0

    def argv(self, transaction: Any) -> list[str]:
        """The command line for one message, placeholders filled in."""
        sender = transaction.sender.address if transaction.sender is not None else ""
        rcpts = [rcpt.address for rcpt in transaction.recipients]
        values = {"%s": sender, "%i": transaction.id}
        out: list[str] = []
        for arg in self.command:
            if arg == "%r":
                out.extend(rcpts)
            else:  # one pass: a sender containing "%i" stays as it is
                out.append(_PLACEHOLDER.sub(lambda match: values[match.group(0)], arg))
        return out

    async def hook_queue(self, transaction: Any) -> tuple[Result, str]:
        from twisted.internet import reactor

        argv = self.argv(transaction)
        env = dict(os.environ)
        env["QPCONN_SENDER"] = transaction.sender.address if transaction.sender else ""
        env["QPCONN_RECIPIENTS"] = " ".join(r.address for r in transaction.recipients)
        env["QPCONN_QUEUE_ID"] = transaction.id
        child = _Child()
        try:
            process = reactor.spawnProcess(child, argv[0], argv, env=env)
        except OSError as exc:
            return self._fail(transaction, f"cannot start {argv[0]}: {exc}")
        timer = reactor.callLater(self.run_timeout, _kill, process)
        state: list[bytes] = []
        chunks = transaction.message_chunks()
        transform = None if self.crlf else (lambda chunk: to_lf(chunk, state))
        try:
            await ChunkProducer(process, chunks, transform).start()
        except Exception as exc:  # the command closed stdin early: its status decides
            self.log.debug("{queue_id} stdin: {error}", queue_id=transaction.id, error=exc)
        finally:
            if state and state[0]:
                process.write(state[0])  # a CR that ended the text
            process.closeStdin()
        code, signal = await child.ended
        name = os.path.basename(argv[0])  # what the client may see of it
        timed_out = not timer.active()
        if timer.active():
            timer.cancel()
        self._log_output(transaction, child)
        if code == 0:
            return OK, f"2.0.0 Queued as {transaction.id}"
        if timed_out:
            return self._fail(transaction, f"{name} did not finish in {self.run_timeout:g}s")
        if signal is not None or code is None:
            return self._fail(transaction, f"{name} was killed by signal {signal}")
        if code in self.tempfail:
            return self._fail(transaction, f"{name} exited with {code} (temporary failure)")
        self.log.error(
            "{queue_id} {command} exited with {code}: message refused",
            queue_id=transaction.id,
            command=name,
            code=code,
        )
        return DONE, f"554 5.3.0 Delivery command failed (exit status {code})"

    def _fail(self, transaction: Any, reason: str) -> tuple[Result, str]:
        self.log.warn("{queue_id} not queued: {reason}", queue_id=transaction.id, reason=reason)
        return DONE, f"451 4.3.0 Delivery command failed ({reason}); try again later"

    def _log_output(self, transaction: Any, child: _Child) -> None:
        for fd, name in ((2, "stderr"), (1, "stdout")):
            text = child.output[fd].decode("utf-8", "replace").strip()
            if text:
                emit = self.log.warn if fd == 2 else self.log.info
                emit("{queue_id} {stream}: {text}", queue_id=transaction.id, stream=name, text=text)


def _kill(process: Any) -> None:
    try:
        process.signalProcess("KILL")
    except error.ProcessExitedAlready:
        pass
