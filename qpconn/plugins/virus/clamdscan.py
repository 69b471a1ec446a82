"""virus/clamdscan: scan each message with clamd (ClamAV's daemon), refuse infected mail.

At ``data_post`` the message is streamed to clamd with its ``INSTREAM`` command (``z``
form: NUL-terminated) over a unix socket or TCP (``clamd_socket``, default Debian's
``/var/run/clamav/clamd.ctl``): 4-octet big-endian length, that many octets, repeated,
then a zero length. clamd answers ``stream: OK`` or ``stream: <name> FOUND``:

* infected: ``552 5.7.0 Virus found: <name>`` (RFC 3463: a security policy refusal),
  nothing is stored;
* clean: ``X-Virus-Checked: Checked by ClamAV on <me>`` goes on top.

When clamd cannot be reached, reports an error (``... ERROR``, e.g. its
``StreamMaxLength`` exceeded), or does not answer within ``timeout`` seconds (default
30), ``on_error tempfail`` (the default: mail that could not be scanned is not let
through) gives ``451 4.7.1`` so the sender retries, and ``on_error accept`` accepts it
unscanned. Messages over ``max_size`` octets (default 26214400, clamd's default stream
limit) are not scanned. The result is in ``transaction.notes["virus"]`` and a verdict.

Arguments: ``clamd_socket /path|HOST:PORT``, ``timeout N``, ``on_error accept|tempfail``,
``max_size N``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from qpconn.hooks.results import DECLINED, DONE
from qpconn.hooks.verdicts import record
from qpconn.kit.policy import parse_options
from qpconn.kit.scanclient import ScanError, endpoint, exchange
from qpconn.kit.threads import run_in_pool
from qpconn.plugins import Plugin
from qpconn.plugins.dkim import message_bytes

__all__ = ["ClamdScan", "NOTE", "instream", "parse_answer"]

NOTE = "virus"
CHUNK = 65536
DEFAULT_SOCKET = "/var/run/clamav/clamd.ctl"


def instream(message: bytes, chunk: int = CHUNK) -> Iterator[bytes]:
    """The INSTREAM request for ``message``, in the pieces written to the socket."""
    yield b"zINSTREAM\0"
    for start in range(0, len(message), chunk):
        piece = message[start : start + chunk]
        yield struct.pack("!I", len(piece)) + piece
    yield struct.pack("!I", 0)


def parse_answer(data: bytes) -> str | None:
    """The virus name, or None when clean; ScanError for an error or nonsense."""
    text = data.rstrip(b"\0\r\n").decode("utf-8", "replace").strip()
    label, sep, result = text.partition(":")
    result = result.strip()
    if not sep or label.strip() != "stream":
        raise ScanError(f"not a clamd answer: {text[:80]!r}")
    if result == "OK":
        return None
    if result.endswith(" FOUND"):
        name = result[: -len(" FOUND")].strip()
        return "".join(ch for ch in name if " " < ch <= "~")[:100] or "unknown"
    raise ScanError(f"clamd: {result[:200]}")


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class ClamdScan(Plugin):
    """Streams each message to clamd at ``data_post``; see the module docstring."""

    def register(self, *args: str) -> None:
        options = parse_options(
            self.name,
            args,
            {"clamd_socket": DEFAULT_SOCKET, "timeout": "30", "on_error": "tempfail",
             "max_size": "26214400"},
            {"on_error": ("accept", "tempfail")},
            numbers=["timeout", "max_size"],
        )  # fmt: skip
        self.address = options["clamd_socket"]
        endpoint(None, self.address, 1.0)  # a bad address stops the start
        self.scan_timeout = float(options["timeout"])
        self.on_error = options["on_error"]
        self.max_size = int(float(options["max_size"]))
        self.timeout = self.scan_timeout + 10

    async def hook_data_post(self, transaction: Any) -> Any:
        message = await run_in_pool("auth", message_bytes, transaction)
        if len(message) > self.max_size:
            record(transaction, self.name, "skip", f"{len(message)} octets > max_size")
            return DECLINED
        try:
            answer = await exchange(
                _reactor(), self.address, instream(message), self.scan_timeout
            )
            virus = parse_answer(answer)
        except ScanError as exc:
            self.log.warn("clamdscan: {address}: {error}", address=self.address, error=exc)
            transaction.notes[NOTE] = {"result": "error", "reason": str(exc)}
            action = "tempfail" if self.on_error == "tempfail" else "accept"
            record(transaction, self.name, "temperror", str(exc), action=action)
            if action == "tempfail":
                return DONE, "451 4.7.1 Virus scanner unavailable; try again later"
            return DECLINED
        if virus is not None:
            transaction.notes[NOTE] = {"result": "infected", "virus": virus}
            record(transaction, self.name, "infected", virus, action="reject")
            return DONE, f"552 5.7.0 Virus found: {virus}"
        transaction.notes[NOTE] = {"result": "clean"}
        transaction.header.add("X-Virus-Checked", f"Checked by ClamAV on {self.server.me}",
                               index=0)  # fmt: skip
        record(transaction, self.name, "clean", "no virus found", action="accept")
        return DECLINED
