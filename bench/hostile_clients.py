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
    A well-behaved client timing what a fresh client gets (connect-to-250 of one
    message on a new connection): see ``hostile_probe.py``.

Both stop on a line or EOF on stdin, SIGTERM or SIGINT, the death of their parent, or
after ``--max-seconds``; they then close every socket and exit. Only 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import resource
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import hostile_probe
from hostile_io import HOST, RECIPIENT, cpu_seconds, emit, install_stop, read_reply

#: what a command trickler trickles, over and over: a first line of 44 octets, 88 s at
#: one byte every 2 s, so that a per-line deadline of 60 s (qpconn's command_deadline,
#: Postfix's smtpd_per_request_deadline at smtpd_timeout 60) cuts it inside a run of a
#: couple of minutes; a server without one lets it carry on with a well-formed session
COMMAND_SCRIPT = (
    b"EHLO trickle-with-a-long-name.attack.test\r\n"
    b"MAIL FROM:<trickle@attack.test>\r\n" + f"RCPT TO:<{RECIPIENT}>\r\n".encode() + b"RSET\r\n"
)
#: the message text a DATA trickler trickles after its header: a line that never holds
#: the end-of-data sequence
BODY_LINE = b"x" * 70 + b"\r\n"
TCP_ESTABLISHED = 1  # tcpi_state in TCP_INFO (linux/tcp_states.h)
TCP_CLOSE_WAIT = 8  # the peer sent its FIN (an orderly close); TCP_CLOSE (7): reset


def source_address(slot: int, sources: int) -> str:
    """The local address a client binds to: 127.0.0.2 and up, or 127.0.0.1 (0 sources)."""
    if sources <= 0:
        return HOST
    return f"127.0.0.{2 + slot % sources}"


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
        #: per kind: how the server ended the connections it closed (the last reply line a
        #: trickler read, or for a non-reader, which reads nothing, FIN or RST) -> count
        self.closed_with: dict[str, dict[str, int]] = {kind: {} for kind in self.stats}

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
                how = await session(source, rng, first, self.stats[kind], kind)
                self.stats[kind]["closed_by_server"] += 1
                tally = self.closed_with[kind]
                tally[how] = tally.get(how, 0) + 1
            except ConnectFailed:
                self.stats[kind]["connect_failed"] += 1
            first = False
            await asyncio.sleep(self.args.reconnect_delay)

    async def trickler(
        self, source: str, rng: random.Random, first: bool, stats: dict[str, int], kind: str
    ) -> str:
        """One trickler's connection; returns, when the server has closed it, how: the
        last reply line it read (``reset`` if the server reset it)."""
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
        last: list[bytes] = [b""]  # the last reply line read, kept by _drain
        try:
            with self.holding(stats):
                refused = await self._trickle(
                    reader, writer, stats, rng, kind == "data_tricklers", last
                )
            if refused is not None:
                return "refused: " + refused.decode("ascii", "replace").strip()[:80]
        except ConnectionResetError:
            return "reset"  # reset by the server: closed like any other way
        except (OSError, asyncio.IncompleteReadError):
            pass  # closed by the server while a reply was awaited
        finally:
            writer.transport.abort()  # no FIN handshake to wait for: gone at once
        return last[0].decode("ascii", "replace").strip()[:100] or "closed, no reply"

    async def _trickle(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stats: dict[str, int],
        rng: random.Random,
        in_data: bool,
        last: list[bytes],
    ) -> bytes | None:
        """Returns when the server closes the connection: None, or the reply that refused
        the session before the trickling began."""
        greeting = await read_reply(reader)
        if not greeting.startswith(b"220"):
            return greeting
        stats["greeted"] += 1
        if in_data:
            for command, code in (
                (b"EHLO trickle.attack.test", b"250"),
                (b"MAIL FROM:<trickle@attack.test>", b"250"),
                (f"RCPT TO:<{RECIPIENT}>".encode(), b"250"),
                (b"DATA", b"354"),
            ):
                writer.write(command + b"\r\n")
                reply = await read_reply(reader)
                if not reply.startswith(code):
                    return reply  # refused: the server ends it or we would sit in a
                    # state we did not mean; come back later
            stats["in_data"] += 1
            script = b"Subject: trickle\r\n\r\n" + BODY_LINE * 1000
        else:
            script = COMMAND_SCRIPT
        drained = asyncio.ensure_future(self._drain(reader, stats, last))
        try:
            if not await self._wait(drained, rng.uniform(0, self.args.interval)):
                return None
            offset = 0
            while True:
                writer.write(script[offset : offset + 1])
                stats["bytes_trickled"] += 1
                offset = (offset + 1) % len(script)
                if in_data and offset == 0:
                    offset = len(b"Subject: trickle\r\n\r\n")  # the header once, lines on
                await writer.drain()
                if not await self._wait(drained, self.args.interval):
                    return None
        finally:
            drained.cancel()

    @staticmethod
    async def _wait(drained: asyncio.Future[None], seconds: float) -> bool:
        """Sleep ``seconds``; False at once if the server closed the connection meanwhile
        (its reset raised here, so that it is told from a close)."""
        done, _ = await asyncio.wait({drained}, timeout=seconds)
        if done and drained.exception() is not None:
            raise drained.exception()  # type: ignore[misc]
        return not done

    @staticmethod
    async def _drain(
        reader: asyncio.StreamReader, stats: dict[str, int], last: list[bytes]
    ) -> None:
        """Read whatever the server says, keeping only its last line (in ``last[0]``),
        until it closes the connection."""
        tail = b""
        while True:
            data = await reader.read(4096)
            if not data:
                if tail.strip():
                    last[0] = tail
                return
            stats["bytes_read"] += len(data)
            tail = (tail + data)[-4096:]
            lines = tail.split(b"\r\n")
            if len(lines) > 1 and lines[-2]:
                last[0] = lines[-2]

    async def non_reader(
        self, source: str, rng: random.Random, first: bool, stats: dict[str, int], kind: str
    ) -> str:
        """One non-reader's connection; returns, when the server has closed it, how: it
        reads nothing, so its TCP state tells a close (FIN) from an abort (RST)."""
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
                while (state := self._tcp_state(sock)) == TCP_ESTABLISHED:
                    await asyncio.sleep(1.0)
                return "FIN (closed)" if state == TCP_CLOSE_WAIT else "RST (aborted)"
            return "reset while sending"  # OSError: the server reset it mid-burst
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
            "closed_with": self.closed_with,
        }


async def attack_main(args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    install_stop(stop, args.max_seconds)
    return await Attack(args).run(stop)


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
    runner = attack_main if args.role == "attack" else hostile_probe.probe_main
    emit("done", asyncio.run(runner(args)))


if __name__ == "__main__":
    main()
