"""The ``hostile`` workload: workload ii while slow and non-reading clients attack the server.

Each measured round runs, on the same server instance, the ii load twice: *clean* (the
probe only) and *attacked* (the probe, and the attackers of ``hostile_clients.py attack``
connected before the load starts and held until it ends). Both runs time fresh clients
(``hostile_clients.py probe``), so the latency figures compare like with like. The table
gives the attacked msg/s next to the clean one, and the fresh clients' p50/p99; the
attackers' own CPU is reported too, so that a slow run cannot be blamed on them unseen.

The attackers, the probe and smtp-source run on the load generator's CPU when pinning is
on; each of them is its own process group, stopped (then killed, bounded) whatever
happens, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from hostile_report import summarize_probes
from servers import Running
from tools import BENCH, log

CLIENTS = BENCH / "hostile_clients.py"

#: seconds before a client the server disconnected comes back (the pressure stays constant)
RECONNECT_DELAY = 0.5


#: the workload's options: (flag, type, default, help)
OPTIONS = (
    ("--hostile-tricklers", int, 200,
     "clients sending one byte every --hostile-interval s, half in a command line, half "
     "in DATA [200]"),
    ("--hostile-non-readers", int, 20, "clients that pipeline NOOPs and never read [20]"),
    ("--hostile-burst", int, 100_000, "NOOPs each non-reader pipelines [100000]"),
    ("--hostile-interval", float, 2.0, "seconds between a trickler's bytes [2]"),
    ("--hostile-sources", int, 220,
     "attackers connect from 127.0.0.2 .. 127.0.0.<1+N>, slot by slot (0: all from "
     "127.0.0.1, like the load) [220: one address each]"),
    ("--hostile-seconds", float, 0.0,
     "size each server's hostile runs to last about this long clean, from its warm-up's "
     "msg/s (0: the messages of --scale), so the deadlines act inside the attacked run; "
     "its smtp-source cap is then at least 3x this [0]"),
    ("--hostile-probes", int, 3000, "at most this many fresh-client probes per run [3000]"),
    ("--hostile-probe-interval", float, 0.05, "seconds between two probes [0.05]"),
    ("--hostile-probe-timeout", float, 10.0,
     "seconds one probe may take before it counts as failed [10]"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the hostile workload (--workloads hostile)")
    for flag, kind, default, text in OPTIONS:
        group.add_argument(flag, type=kind, default=default, help=text)


def apply_quick(args: argparse.Namespace) -> None:
    """--quick: a tenth of the attackers, short bursts, fast trickling, a few probes."""
    args.hostile_tricklers = min(args.hostile_tricklers, 20)
    args.hostile_non_readers = min(args.hostile_non_readers, 4)
    args.hostile_burst = min(args.hostile_burst, 5000)
    args.hostile_interval = min(args.hostile_interval, 0.2)
    args.hostile_sources = min(args.hostile_sources, 24)
    args.hostile_probes = min(args.hostile_probes, 20)
    args.hostile_probe_timeout = min(args.hostile_probe_timeout, 5.0)


def sized(args: argparse.Namespace, warmup: int, warm: dict[str, Any], messages: int) -> int:
    """The messages of one hostile run for a server: ``messages`` (from ``--scale``), or
    with ``--hostile-seconds`` what the server serves in that time at its warm-up's rate
    (at least the load's 50 sessions), so that every server is attacked as long."""
    if args.hostile_seconds <= 0:
        return messages
    rate = warmup / max(warm["seconds"], 1e-3)
    return max(50, round(rate * args.hostile_seconds))


def run_cap(args: argparse.Namespace) -> float:
    """smtp-source's time limit in a hostile run: ``--max-seconds``, or three times
    ``--hostile-seconds`` if that is longer (an attacked run may well be slower)."""
    return max(args.max_seconds, 3 * args.hostile_seconds)


def describe(args: argparse.Namespace) -> str:
    """The attack in words, for the table's row title."""
    return f"+ {args.hostile_tricklers} tricklers, {args.hostile_non_readers} non-readers"


# -- the helper processes ------------------------------------------------------------------
class Helper:
    """One hostile_clients.py process: started, its ``ready`` line awaited, stopped."""

    def __init__(self, role: str, argv: list[str], cpu: int | None) -> None:
        self.role = role
        command = [sys.executable, str(CLIENTS), role, *argv]
        if cpu is not None:
            command = ["taskset", "-c", str(cpu), *command]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own group: killed as one, not hit by the tty's ^C
        )
        self.pid = self.proc.pid

    def ready(self, timeout: float) -> dict[str, Any]:
        """Until the process prints its ``ready`` line (bounded)."""
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise RuntimeError(f"{self.role}: not ready after {timeout:.0f} s")
        line = self.proc.stdout.readline().decode()
        tag, _, payload = line.partition(" ")
        if tag != "ready":
            err = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
            raise RuntimeError(f"{self.role}: {line.strip() or 'no output'} {err[-300:]}")
        result: dict[str, Any] = json.loads(payload)
        return result

    def stop(self, timeout: float) -> dict[str, Any]:
        """Tell it to stop (a line on stdin), its final figures; killed if it overstays."""
        try:
            out, err = self.proc.communicate(b"stop\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"{self.role}: did not stop within {timeout:.0f} s") from None
        for line in out.decode().splitlines():
            tag, _, payload = line.partition(" ")
            if tag == "done":
                result: dict[str, Any] = json.loads(payload)
                return result
        raise RuntimeError(f"{self.role}: no figures (exit {self.proc.returncode}): "
                           f"{err.decode()[-300:]}")  # fmt: skip

    def kill(self) -> None:
        """SIGTERM to its group, then SIGKILL; bounded. A no-op once it has exited."""
        if self.proc.poll() is None:
            for signum, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signum)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@contextlib.contextmanager
def around_load(
    server: Running, args: argparse.Namespace, attack: bool
) -> Iterator[dict[str, Any]]:
    """The attackers (if ``attack``) and the probe, running for the duration of the block.

    Yields a dict filled in on the way out: ``probe`` (the latencies), ``attack`` (the
    attackers' figures), ``attacker_pid`` and ``probe_pid``. Whatever happens in the block,
    every helper process is gone when this returns.
    """
    extra: dict[str, Any] = {}
    helpers: list[Helper] = []
    stop_within = args.hostile_probe_timeout + 30
    try:
        if attack:
            attacker = Helper("attack", [
                "--port", str(server.port),
                "--tricklers", str(args.hostile_tricklers),
                "--non-readers", str(args.hostile_non_readers),
                "--burst", str(args.hostile_burst),
                "--interval", str(args.hostile_interval),
                "--sources", str(args.hostile_sources),
                "--reconnect-delay", str(RECONNECT_DELAY),
                "--max-seconds", str(run_cap(args) + 120),
            ], server.gen_cpu)  # fmt: skip
            helpers.append(attacker)
            extra["attacker_pid"] = attacker.pid
            ready = attacker.ready(timeout=30.0)
            extra["attack_ready"] = ready
            log(f"{server.spec.name}: attackers ready (pid {attacker.pid}, "
                f"{ready['seconds']:.2f} s)")  # fmt: skip
        probe = Helper("probe", [
            "--port", str(server.port),
            "--count", str(args.hostile_probes),
            "--interval", str(args.hostile_probe_interval),
            "--timeout", str(args.hostile_probe_timeout),
            "--max-seconds", str(run_cap(args) + 60),
        ], server.gen_cpu)  # fmt: skip
        helpers.append(probe)
        extra["probe_pid"] = probe.pid
        probe.ready(timeout=30.0)
        yield extra
        # The probe first: its last probes still see the attack.
        probed = probe.stop(stop_within)
        extra["probe"] = summarize_probes(probed)
        extra["probe_cpu_user_s"] = probed["cpu"]["user"]
        if attack:
            extra["attack"] = helpers[0].stop(stop_within)
    finally:
        for helper in helpers:
            helper.kill()


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The attack's parameters, kept in the report beside its figures."""
    attackers = args.hostile_tricklers + args.hostile_non_readers
    return {
        "tricklers": args.hostile_tricklers,
        "non_readers": args.hostile_non_readers,
        "burst": args.hostile_burst,
        "interval_s": args.hostile_interval,
        "sources": args.hostile_sources,
        "source_range": (
            f"127.0.0.2-127.0.0.{1 + min(args.hostile_sources, attackers)}"
            if args.hostile_sources > 0
            else "127.0.0.1"
        ),
        "reconnect_delay_s": RECONNECT_DELAY,
        "probes_max": args.hostile_probes,
        "probe_interval_s": args.hostile_probe_interval,
        "probe_timeout_s": args.hostile_probe_timeout,
        "seconds": args.hostile_seconds,
    }
