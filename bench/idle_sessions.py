"""Memory per idle session: hold N sessions that have sent EHLO open on one server.

Opens sessions in batches (each batch concurrently: connect, read the greeting, EHLO,
read the reply), keeps them all open and idle, and reads the server's VmRSS before and
after. Greeting latency (connect until the whole 220 reply has arrived) is probed with
sequential fresh connections before the load and again while the N sessions are held.

Prints one JSON object. Run by ``bench/run``; on its own::

    python bench/idle_sessions.py --port 2525 --server-pid 1234 --sessions 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time

HOST = "127.0.0.1"


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One whole (possibly multi-line) SMTP reply."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


class Session:
    __slots__ = ("greeting_s", "reader", "writer")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting_s: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting_s = greeting_s


async def open_session(port: int, ehlo: bool = True) -> Session:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port)
    greeting = await read_reply(reader)
    elapsed = time.perf_counter() - started
    if not greeting.startswith(b"220"):
        raise ConnectionError(f"greeting {greeting!r}")
    if ehlo:
        writer.write(b"EHLO idle.bench.test\r\n")
        reply = await read_reply(reader)
        if not reply.startswith(b"250"):
            raise ConnectionError(f"EHLO reply {reply!r}")
    return Session(reader, writer, elapsed)


async def close(session: Session) -> None:
    session.writer.close()
    try:
        await session.writer.wait_closed()
    except OSError:
        pass


async def probe(port: int, count: int) -> list[float]:
    """Greeting latencies (seconds) of ``count`` fresh connections, one after the other."""
    latencies = []
    for _ in range(count):
        session = await open_session(port, ehlo=False)
        latencies.append(session.greeting_s)
        session.writer.write(b"QUIT\r\n")
        await close(session)
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ms = sorted(value * 1000 for value in latencies)
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
        "max_ms": round(ms[-1], 3),
    }


async def measure(port: int, pid: int, sessions: int, batch: int, probes: int) -> dict:
    # Warm the server's allocator and caches so the baseline is not its cold start.
    for _ in range(4):
        warm = await asyncio.gather(*(open_session(port) for _ in range(batch)))
        await asyncio.gather(*(close(s) for s in warm))
    await asyncio.sleep(0.5)
    rss_before = status_kib(pid, "VmRSS")
    idle_probe = await probe(port, probes)

    held: list[Session] = []
    started = time.perf_counter()
    while len(held) < sessions:
        size = min(batch, sessions - len(held))
        held += await asyncio.gather(*(open_session(port) for _ in range(size)))
    open_s = time.perf_counter() - started
    await asyncio.sleep(1.0)
    rss_after = status_kib(pid, "VmRSS")
    loaded_probe = await probe(port, probes)
    # Every held session must still be there: one RSET each on a sample of them (RSET, not
    # NOOP, which twisted.mail does not implement).
    for session in held[:: max(1, sessions // 50)]:
        session.writer.write(b"RSET\r\n")
        reply = await read_reply(session.reader)
        if not reply.startswith(b"250"):
            raise ConnectionError(f"RSET on an idle session: {reply!r}")
    hwm = status_kib(pid, "VmHWM")
    await asyncio.gather(*(close(s) for s in held))
    return {
        "sessions": sessions,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "hwm_kib": hwm,
        "per_session_kib": round((rss_after - rss_before) / sessions, 2),
        "open_seconds": round(open_s, 3),
        "greeting_idle": summary(idle_probe),
        "greeting_loaded": summary(loaded_probe),
        "greeting_while_opening": summary([s.greeting_s for s in held[-batch:]]),
    }


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=50, help="sessions opened at once")
    parser.add_argument("--probes", type=int, default=100, help="greeting-latency samples")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after seconds")
    args = parser.parse_args()
    limit = raise_nofile(args.sessions + args.batch + 200)
    if limit < args.sessions + args.batch + 50:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}: too low for {args.sessions} sessions")
    result = asyncio.run(
        asyncio.wait_for(
            measure(args.port, args.server_pid, args.sessions, args.batch, args.probes),
            args.timeout,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
