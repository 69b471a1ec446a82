"""The hostile workload's fresh-client probe (``hostile_clients.py probe``).

A well-behaved client measuring what a fresh client gets: it opens a new connection,
sends one complete message (EHLO, MAIL, RCPT, DATA, ``--size`` bytes, ``.``) and times
connect-to-250; then QUIT. Sequential, ``--interval`` apart, at most ``--count`` probes,
each bounded by ``--timeout`` (a probe that times out or is refused is a failure). A
process of its own, so that its timings do not wait behind the attackers' event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

from hostile_io import HOST, RECIPIENT, cpu_seconds, emit, install_stop, read_reply


# -- the probe -----------------------------------------------------------------------------
class ProbeError(Exception):
    """The server answered a probe's command with something other than success."""


async def one_probe(port: int, body: bytes) -> tuple[float, float]:
    """One fresh client's message: (connect-to-greeting, connect-to-250) in seconds."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        greeting = await read_reply(reader)
        greeted = time.perf_counter() - started
        if not greeting.startswith(b"220"):
            raise ProbeError(f"greeting {greeting[:80]!r}")
        for command, code in (
            (b"EHLO probe.bench.test", b"250"),
            (b"MAIL FROM:<probe@source.test>", b"250"),
            (f"RCPT TO:<{RECIPIENT}>".encode(), b"250"),
            (b"DATA", b"354"),
            (body + b".", b"250"),
        ):
            writer.write(command + b"\r\n")
            reply = await read_reply(reader)
            if not reply.startswith(code):
                raise ProbeError(f"{command[:12]!r}: {reply[:80]!r}")
        delivered = time.perf_counter() - started
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            await asyncio.wait_for(read_reply(reader), 2.0)  # untimed, bounded
        return greeted, delivered
    finally:
        writer.transport.abort()


def probe_body(size: int) -> bytes:
    """A message of about ``size`` bytes, as smtp-source sends (lines of text, no dots)."""
    header = b"From: <probe@source.test>\r\nTo: <" + RECIPIENT.encode() + b">\r\n"
    header += b"Subject: probe\r\n\r\n"
    line = b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\r\n"
    return header + line * max(1, size // len(line))


async def probe_main(args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    install_stop(stop, args.max_seconds)
    deadline = time.monotonic() + args.max_seconds
    body = probe_body(args.size)
    emit("ready", {})
    probes: list[dict[str, Any]] = []
    while len(probes) < args.count and time.monotonic() < deadline:
        if stop.is_set() and len(probes) >= args.min_count:
            break
        started = time.perf_counter()
        try:
            greeted, delivered = await asyncio.wait_for(one_probe(args.port, body), args.timeout)
            probes.append({"ok": True, "ms": delivered * 1000, "greeting_ms": greeted * 1000})
        except (OSError, TimeoutError, ProbeError, asyncio.IncompleteReadError) as exc:
            elapsed = time.perf_counter() - started
            reason = "timeout" if isinstance(exc, TimeoutError) else f"{exc}"[:160]
            probes.append({"ok": False, "ms": elapsed * 1000, "error": reason})
        if not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
    return {"probes": probes, "timeout_ms": args.timeout * 1000, "cpu": cpu_seconds()}

