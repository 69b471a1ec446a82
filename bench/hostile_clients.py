"""The hostile workload's clients: the attackers, and the fresh-client probe.

Two roles, each its own process (started by ``bench/run --workloads hostile``, see
``bench/hostile.py``), so that the probe's timings do not wait behind the attackers' event
loop and the attackers' CPU can be read on its own:

``attack``
    One asyncio process for every attacker (no threads: 220 sockets on one selector cost a
    few ms of CPU per second, so the attack does not compete with the load generator).

    * *tricklers* (``--tricklers``, half of each kind): clients that send one byte every
      ``--interval`` seconds (each with its own phase) and read what comes back. A
      *command* trickler waits for the greeting, then trickles ``EHLO ...``, ``MAIL ...``
      one byte at a time, so it sits inside a command line; a *DATA* trickler sends EHLO,
      MAIL, RCPT and DATA at normal speed and, after the 354, trickles the message text,
      which never ends.
    * *non-readers* (``--non-readers``): clients that never call recv(). Each connects with
      a small receive buffer, pipelines ``--burst`` NOOP commands as fast as the server
      takes them and then holds the connection: a server that does not stop reading when
      its replies cannot be delivered buffers them all in memory.

    A client the server disconnects comes back after ``--reconnect-delay`` seconds, so the
    pressure stays constant for the whole run. Each client connects from
    ``127.0.0.<2 + slot % sources>`` (``--sources``; 0: from 127.0.0.1), so a per-address
    connection limit cannot refuse them all at once, as it could not refuse a distributed
    attack. Prints one ``ready`` JSON line when every client has made its first connection
    attempt, and the final statistics (JSON) when stopped.

``probe``
    A well-behaved client measuring what a fresh client gets: it opens a new connection,
    sends one complete message (EHLO, MAIL, RCPT, DATA, ``--size`` bytes, ``.``) and times
    connect-to-250; then QUIT. Sequential, ``--interval`` apart, at most ``--count``
    probes, each bounded by ``--timeout`` (a probe that times out or is refused is a
    failure). Prints a ``ready`` line, then the latencies as JSON when stopped.

Both stop on a line or EOF on stdin, SIGTERM or SIGINT, the death of their parent, or
after ``--max-seconds``; they then close every socket and exit. Only 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

HOST = "127.0.0.1"
HOSTNAME = "bench.test"
RECIPIENT = f"user@{HOSTNAME}"

#: what a command trickler trickles, over and over (it never gets past the first line in
#: a run of the benchmark, but a long run would carry on with a well-formed session)
COMMAND_SCRIPT = (
    b"EHLO trickle.attack.test\r\n"
    b"MAIL FROM:<trickle@attack.test>\r\n" + f"RCPT TO:<{RECIPIENT}>\r\n".encode() + b"RSET\r\n"
)
#: the message text a DATA trickler trickles after its header: a line that never holds
#: the end-of-data sequence
BODY_LINE = b"x" * 70 + b"\r\n"
TCP_ESTABLISHED = 1  # tcpi_state in TCP_INFO (linux/tcp_states.h)


def cpu_seconds() -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": usage.ru_utime, "system": usage.ru_stime}


def emit(tag: str, payload: dict[str, Any]) -> None:
    """One line on stdout for the harness: ``<tag> <json>``."""
    sys.stdout.write(f"{tag} {json.dumps(payload)}\n")
    sys.stdout.flush()


def source_address(slot: int, sources: int) -> str:
    """The local address a client binds to: 127.0.0.2 and up, or 127.0.0.1 (0 sources)."""
    if sources <= 0:
        return HOST
    return f"127.0.0.{2 + slot % sources}"


def install_stop(stop: asyncio.Event, max_seconds: float) -> None:
    """Every way this process is told to stop sets ``stop``: stdin, signals, the parent's
    death (the harness killed hard leaves no attackers behind), the deadline."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def on_stdin() -> None:
        try:
            os.read(sys.stdin.fileno(), 4096)
        except OSError:
            pass
        # Any line, or EOF (the harness went away), means stop.
        loop.remove_reader(sys.stdin.fileno())
        stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    loop.call_later(max_seconds, stop.set)
    parent = os.getppid()

    def watch_parent() -> None:
        if os.getppid() != parent:
            stop.set()
        else:
            loop.call_later(1.0, watch_parent)

    loop.call_later(1.0, watch_parent)


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """The last line of one (possibly multi-line) SMTP reply."""
    for _ in range(1000):  # a reply of more lines than this is not SMTP
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by the server")
        if line[3:4] != b"-":
            return line
    raise ConnectionError("endless reply")


# -- the attack ----------------------------------------------------------------------------
class ConnectFailed(Exception):
    """An attacker's connection attempt failed (refused, reset, or timed out)."""


class Attack:
    """Every attacker of one run, on one event loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.address = (HOST, args.port)
        self.slots = args.tricklers + args.non_readers
        self.first_attempts = 0
        self.all_tried = asyncio.Event()
        self.stats: dict[str, dict[str, int]] = {
            kind: {
                "connected": 0,
                "connect_failed": 0,
                "closed_by_server": 0,
                "open": 0,
                "max_open": 0,
            }
            for kind in ("command_tricklers", "data_tricklers", "non_readers")
        }
        for kind in ("command_tricklers", "data_tricklers"):
            self.stats[kind].update(greeted=0, bytes_trickled=0, bytes_read=0)
        self.stats["data_tricklers"]["in_data"] = 0
        self.stats["non_readers"].update(bursts_sent=0, bytes_sent=0)

    def tried(self) -> None:
        """One client's first connection attempt is over (connected or not)."""
        self.first_attempts += 1
        if self.first_attempts >= self.slots:
            self.all_tried.set()

    @contextlib.contextmanager
    def holding(self, stats: dict[str, int]) -> Iterator[None]:
        """Counts one open connection of a kind while the block runs."""
        stats["connected"] += 1
        stats["open"] += 1
        stats["max_open"] = max(stats["max_open"], stats["open"])
        try:
            yield
        finally:
            stats["open"] -= 1

    async def client(self, slot: int, kind: str, session: Callable[..., Any]) -> None:
        """Connect, run ``session`` until the server ends it, come back; until cancelled."""
        first = True
        source = source_address(slot, self.args.sources)
        rng = random.Random(slot)  # each client's phase, the same in every run
        while True:
            try:
                await session(source, rng, first, self.stats[kind], kind)
                self.stats[kind]["closed_by_server"] += 1
            except ConnectFailed:
                self.stats[kind]["connect_failed"] += 1
            first = False
            await asyncio.sleep(self.args.reconnect_delay)

    async def trickler(
        self, source: str, rng: random.Random, first: bool, stats: dict[str, int], kind: str
    ) -> None:
        """One trickler's connection; returns when the server has closed it."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*self.address, local_addr=(source, 0)),
                self.args.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(str(exc)) from exc
        finally:
            if first:
                self.tried()
        try:
            with self.holding(stats):
                await self._trickle(reader, writer, stats, rng, kind == "data_tricklers")
        except (OSError, asyncio.IncompleteReadError):
            pass  # reset by the server: closed like any other way
        finally:
            writer.transport.abort()  # no FIN handshake to wait for: gone at once

    async def _trickle(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stats: dict[str, int],
        rng: random.Random,
        in_data: bool,
    ) -> None:
        """Returns when the server closes the connection."""
        if not (await read_reply(reader)).startswith(b"220"):
            return
        stats["greeted"] += 1
        if in_data:
            for command, code in (
                (b"EHLO trickle.attack.test", b"250"),
                (b"MAIL FROM:<trickle@attack.test>", b"250"),
                (f"RCPT TO:<{RECIPIENT}>".encode(), b"250"),
                (b"DATA", b"354"),
            ):
                writer.write(command + b"\r\n")
                if not (await read_reply(reader)).startswith(code):
                    return  # refused: the server ends it or we would sit in a state we
                    # did not mean; come back later
            stats["in_data"] += 1
            script = b"Subject: trickle\r\n\r\n" + BODY_LINE * 1000
        else:
            script = COMMAND_SCRIPT
        drained = asyncio.ensure_future(self._drain(reader, stats))
        try:
            if not await self._wait(drained, rng.uniform(0, self.args.interval)):
                return
            offset = 0
            while True:
                writer.write(script[offset : offset + 1])
                stats["bytes_trickled"] += 1
                offset = (offset + 1) % len(script)
                if in_data and offset == 0:
                    offset = len(b"Subject: trickle\r\n\r\n")  # the header once, lines on
                await writer.drain()
                if not await self._wait(drained, self.args.interval):
                    return
        finally:
            drained.cancel()

    @staticmethod
    async def _wait(drained: asyncio.Future[None], seconds: float) -> bool:
        """Sleep ``seconds``; False at once if the server closed the connection meanwhile."""
        done, _ = await asyncio.wait({drained}, timeout=seconds)
        return not done

    @staticmethod
    async def _drain(reader: asyncio.StreamReader, stats: dict[str, int]) -> None:
        """Read and forget whatever the server says, until it closes the connection."""
        while True:
            data = await reader.read(4096)
            if not data:
                return
            stats["bytes_read"] += len(data)

    async def non_reader(
        self, source: str, rng: random.Random, first: bool, stats: dict[str, int], kind: str
    ) -> None:
        """One non-reader's connection; returns when the server has closed it."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # A small receive window (set before connecting, so it is what is advertised):
            # the server's replies have nowhere to go after a few KiB.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            try:
                sock.bind((source, 0))
                await asyncio.wait_for(
                    loop.sock_connect(sock, self.address), self.args.connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                raise ConnectFailed(str(exc)) from exc
            finally:
                if first:
                    self.tried()
            with self.holding(stats), contextlib.suppress(OSError):
                left = self.args.burst
                while left > 0:
                    piece = b"NOOP\r\n" * min(left, 10000)
                    await loop.sock_sendall(sock, piece)
                    stats["bytes_sent"] += len(piece)
                    left -= min(left, 10000)
                stats["bursts_sent"] += 1
                # Hold it, never reading, until the server closes it (seen in the
                # connection's TCP state, which needs no recv()).
                while self._tcp_state(sock) == TCP_ESTABLISHED:
                    await asyncio.sleep(1.0)
        finally:
            sock.close()  # unread data in the receive buffer: the kernel sends a RST

    @staticmethod
    def _tcp_state(sock: socket.socket) -> int:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]

    async def run(self, stop: asyncio.Event) -> dict[str, Any]:
        started = time.monotonic()
        clients = []
        half = self.args.tricklers // 2
        for slot in range(self.args.tricklers):
            kind = "command_tricklers" if slot < self.args.tricklers - half else "data_tricklers"
            clients.append(asyncio.ensure_future(self.client(slot, kind, self.trickler)))
        for slot in range(self.args.tricklers, self.slots):
            clients.append(asyncio.ensure_future(self.client(slot, "non_readers", self.non_reader)))
        if self.slots == 0:
            self.all_tried.set()
        waiter = asyncio.ensure_future(self.all_tried.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        ready_at = time.monotonic()
        cpu_ready = cpu_seconds()
        emit("ready", {"seconds": round(ready_at - started, 3), "stats": self.stats})
        await stopper
        stopped_at = time.monotonic()
        cpu_stop = cpu_seconds()
        open_at_stop = {kind: stats["open"] for kind, stats in self.stats.items()}
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        return {
            "sources": self.args.sources,
            "ramp_seconds": round(ready_at - started, 3),
            "seconds": round(stopped_at - ready_at, 3),
            # CPU of this process between ready and stop: the attack while the load ran
            "cpu_user_s": round(cpu_stop["user"] - cpu_ready["user"], 3),
            "cpu_system_s": round(cpu_stop["system"] - cpu_ready["system"], 3),
            "cpu_total_s": round(sum(cpu_seconds().values()), 3),
            "open_at_stop": open_at_stop,
            "stats": self.stats,
        }


async def attack_main(args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    install_stop(stop, args.max_seconds)
    return await Attack(args).run(stop)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    roles = parser.add_subparsers(dest="role", required=True)
    attack = roles.add_parser("attack", help="the tricklers and non-readers")
    attack.add_argument("--port", type=int, required=True)
    attack.add_argument("--tricklers", type=int, default=200)
    attack.add_argument("--non-readers", type=int, default=20)
    attack.add_argument("--interval", type=float, default=2.0, help="seconds between bytes")
    attack.add_argument("--burst", type=int, default=100_000, help="NOOPs per non-reader")
    attack.add_argument("--sources", type=int, default=220, help="127.0.0.2.. (0: .1)")
    attack.add_argument("--connect-timeout", type=float, default=10.0)
    attack.add_argument("--reconnect-delay", type=float, default=0.5)
    attack.add_argument("--max-seconds", type=float, default=600.0)
    probe = roles.add_parser("probe", help="fresh clients, one message each, timed")
    probe.add_argument("--port", type=int, required=True)
    probe.add_argument("--count", type=int, default=300, help="at most this many probes")
    probe.add_argument("--min-count", type=int, default=5, help="even if stopped sooner")
    probe.add_argument("--interval", type=float, default=0.05, help="seconds between probes")
    probe.add_argument("--timeout", type=float, default=10.0, help="seconds per probe")
    probe.add_argument("--size", type=int, default=1024, help="message bytes")
    probe.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.role == "attack" and not 0 <= args.sources <= 250:
        parser.error("--sources: 0 to 250 (127.0.0.2 to 127.0.0.251)")
    if args.role == "attack":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, max(soft, args.tricklers + args.non_readers + 100))
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    runner = attack_main if args.role == "attack" else probe_main
    emit("done", asyncio.run(runner(args)))


if __name__ == "__main__":
    main()
