"""qpconn benchmark: qpconn against other SMTP servers, driven by Postfix's smtp-source.

One command (``bench/run``, or ``python bench/run.py``) fetches what it needs, starts each
server fresh on 127.0.0.1, warms it up, runs the workloads, measures an idle-session
memory figure, and prints one table. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastlog_server
import hostile
import hostile_report
import profiling
import servers
import tools
import variants
from servers import HOSTNAME, Running, ServerSpec
from tools import BENCH, log

SENDER = "bench@source.test"
RECIPIENT = f"user@{HOSTNAME}"


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    sessions: int
    messages: int
    size: int  # payload bytes per message (smtp-source adds a few header lines)
    reuse: bool  # True: sessions send message after message; False: one message each
    #: True: each round runs this load clean and then under attack (bench/hostile.py)
    attack: bool = False

    def count(self, scale: float) -> int:
        return max(self.sessions, round(self.messages * scale))

    def describe(self, scale: float) -> str:
        size = f"{self.size // 1024} KiB"
        how = f"{self.sessions} conn" if self.reuse else f"new conn/msg, {self.sessions} at once"
        if self.attack:
            return f"{self.key}: ii ({how}, {self.count(scale)} x {size}) under attack"
        return f"{self.key}: {how}, {self.count(scale)} x {size}"


WORKLOADS = {
    w.key: w
    for w in (
        Workload("i", "1 connection, sequential", 1, 2000, 1024, True),
        Workload("ii", "50 connections", 50, 20000, 1024, True),
        Workload("iii", "20 connections, 100 KiB", 20, 2000, 102400, True),
        Workload("iv", "new connection per message, 10 at once", 10, 5000, 1024, False),
        Workload("hostile", "ii, attacked", 50, 20000, 1024, True, attack=True),
    )
}

#: The issues' targets for the qpconn sink, as (workload, peer, minimum msg/s ratio): issue
#: 6's, raised where issue 20 ("Speed, raised") asks more of the same ratio.
TARGETS = (
    ("ii", "twisted.mail", 1.5),
    ("ii", "smtp-sink", 0.5),
    ("ii", "haraka", 2.0),
    ("ii", "aiosmtpd", 2.5),
    ("iii", "twisted.mail", 5.0),
    ("iv", "twisted.mail", 1.3),
    ("iv", "smtp-sink", 0.55),
    ("i", "twisted.mail", 0.95),
)
#: issue 20's target for the durable default: the Maildir configuration against Postfix's
MAILDIR_TARGETS = (("ii", "postfix-maildir", 2.5),)
IDLE_TARGET_KIB = 4.0


# -- the load generator ----------------------------------------------------------------
def generate(
    postfix: tools.Postfix,
    port: int,
    workload: Workload,
    messages: int,
    cpu: int | None,
    timeout: float,
) -> dict[str, Any]:
    """Run smtp-source once; wall time, its own CPU time, and whether it finished."""
    argv = [str(postfix.smtp_source)]
    if workload.reuse:
        argv.append("-d")
    argv += [
        "-s", str(workload.sessions), "-m", str(messages), "-l", str(workload.size),
        "-f", SENDER, "-t", RECIPIENT, "-M", HOSTNAME, f"127.0.0.1:{port}",
    ]  # fmt: skip
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        env=postfix.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
        error = err.strip().splitlines()[-1] if proc.returncode else None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        error = f"timeout: not done after {timeout:.0f} s"
    except BaseException:
        # Ctrl-C (or SIGTERM) while it runs: it has a session of its own, so nobody else
        # would stop it.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    gen_user = after.ru_utime - before.ru_utime
    gen_cpu = gen_user + (after.ru_stime - before.ru_stime)
    return {"seconds": seconds, "gen_cpu_s": gen_cpu, "gen_user_s": gen_user, "error": error}


# -- one server, one workload ----------------------------------------------------------
def user_cpu_seconds() -> float:
    """User-mode CPU time of the whole machine (all CPUs, user + nice), from /proc/stat.

    User time only: the kernel's loopback networking (softirq) is charged to no process,
    so counting system time would blame the benchmark's own traffic on "others".
    """
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    return (fields[0] + fields[1]) / servers.CLOCK_TICKS


def measure_workload(
    specs: list[ServerSpec],
    workload: Workload,
    postfix: tools.Postfix,
    args: argparse.Namespace,
    scratch: Path,
) -> dict[str, dict[str, Any]]:
    """Every server started fresh and warmed up, then their runs interleaved round-robin.

    Interleaving puts a noisy moment of a shared machine into one run of every server
    rather than into all runs of one, so the ratios stay fair.
    """
    messages = workload.count(args.scale)
    floor = workload.sessions if args.quick else 100  # warm-up messages, at least
    warmup = min(2000, max(floor, workload.sessions * 2, messages // 10))
    results: dict[str, dict[str, Any]] = {}
    running: dict[str, Running] = {}
    try:
        for spec in specs:
            if spec.workloads is not None and workload.key not in spec.workloads:
                continue
            results[spec.name] = {"messages": messages, "runs": []}
            workdir = Path(tempfile.mkdtemp(prefix=f"{spec.name}-{workload.key}-", dir=scratch))
            try:
                server = Running(spec, workdir, args.server_cpu if spec.pinned else None)
                pin_gen = spec.pinned or spec.pin_load_generator
                server.gen_cpu = args.gen_cpu if pin_gen else None
                running[spec.name] = server
                server.wait_ready()
                warm = generate(
                    postfix, server.port, workload, warmup, server.gen_cpu, args.max_seconds
                )
                if warm["error"]:
                    raise RuntimeError(f"warm-up failed: {warm['error']}")
                if workload.attack:  # --hostile-seconds: as many as it serves in that time
                    results[spec.name]["messages"] = hostile.sized(args, warmup, warm, messages)
            except Exception as exc:
                results[spec.name]["error"] = str(exc)
                log(f"{spec.name} {workload.key}: {exc}")
                if spec.name in running:
                    running.pop(spec.name).stop()
        for _ in range(args.runs):
            for name, server in running.items():
                if server.proc.poll() is not None:
                    continue
                if workload.attack:
                    count = results[name]["messages"]
                    hostile_round(server, workload, count, postfix, args, results[name])
                    continue
                results[name]["runs"].append(one_run(server, workload, messages, postfix, args))
        for name, server in running.items():
            if server.proc.poll() is None:
                results[name]["hwm_kib"] = server.status_kib("VmHWM")
            else:
                results[name]["error"] = f"server died: {server.tail(2)}"
    finally:
        for server in running.values():
            server.stop()
            servers.set_aside(server.workdir, scratch)
    for result in results.values():
        summarize_cell(result)
        if workload.attack:
            hostile_report.summarize(result, summarize_cell)
    return results


def one_run(
    server: Running,
    workload: Workload,
    messages: int,
    postfix: tools.Postfix,
    args: argparse.Namespace,
    around: Callable[[], AbstractContextManager[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """One measured smtp-source run; ``around`` runs other clients for its duration (the
    hostile workload's attackers and probe) and adds their figures to the run's."""
    server.between_runs()
    with (around or contextlib.nullcontext)() as extra:
        cpu_before = server.cpu_seconds()
        waited_before = server.runqueue_seconds()
        user_before = server.cpu_seconds(user_only=True)
        machine_before = user_cpu_seconds()
        cap = hostile.run_cap(args) if workload.attack else args.max_seconds
        run = generate(postfix, server.port, workload, messages, server.gen_cpu, cap)
        server_cpu = server.cpu_seconds() - cpu_before
        # (a server whose processes come and go, Postfix's, loses its exited ones' share:
        # only a rough figure there, never below 0)
        waited = max(0.0, server.runqueue_seconds() - waited_before)
        server_user = server.cpu_seconds(user_only=True) - user_before
        machine = user_cpu_seconds() - machine_before
        run["rss_kib"] = server.status_kib("VmRSS")  # while the other clients still hold on
    run.update(extra or {})
    run["server_cpu_s"] = server_cpu
    # Ready to run, but its CPU was taken (by other processes pinned there too)
    run["server_runqueue_s"] = waited
    # What other processes on the machine used meanwhile (other users, test suites...);
    # the attackers' and the probe's own CPU is not theirs.
    helpers = run.get("attack", {}).get("cpu_user_s", 0.0) + run.get("probe_cpu_user_s", 0.0)
    others = machine - server_user - run["gen_user_s"] - helpers
    run["foreign_cpu_pct"] = max(0.0, 100 * others / run["seconds"])
    if not run["error"]:
        run["rate"] = messages / run["seconds"]
        run["cpu_ms_per_msg"] = 1000 * server_cpu / messages
    # Untimed, and before the next server's run: a server that keeps working after its
    # 250s (Postfix delivering its queue) must not do so during another server's run.
    server.between_runs()
    log(
        f"{server.spec.name:15} {workload.key:3} "
        + (
            f"{run['rate']:8.0f} msg/s  server CPU {run['cpu_ms_per_msg']:.3f} ms/msg"
            f"  smtp-source CPU {100 * run['gen_cpu_s'] / run['seconds']:.0f}%"
            f"  others {run['foreign_cpu_pct']:.0f}%"
            f"  server waited for its CPU {100 * waited / run['seconds']:.0f}%"
            if not run["error"]
            else f"FAILED: {run['error']}"
        )
        + (hostile_report.log_suffix(run) if "probe" in run else "")
    )
    return run


def hostile_round(
    server: Running,
    workload: Workload,
    messages: int,
    postfix: tools.Postfix,
    args: argparse.Namespace,
    cell: dict[str, Any],
) -> None:
    """One round of the hostile workload: the load clean, then attacked, both probed.

    On the same server, seconds apart, so the ratio of the two is fair; the next round's
    clean run, after an attacked one, also shows whether the server recovered.
    """
    clean = cell.setdefault("clean", {"messages": messages, "runs": []})
    clean["runs"].append(
        one_run(
            server, workload, messages, postfix, args,
            lambda: hostile.around_load(server, args, attack=False),
        )
    )  # fmt: skip
    cell["runs"].append(
        one_run(
            server, workload, messages, postfix, args,
            lambda: hostile.around_load(server, args, attack=True),
        )
    )  # fmt: skip


def summarize_cell(result: dict[str, Any]) -> None:
    good = [r for r in result["runs"] if not r["error"]]
    if not good:
        return
    rates = [r["rate"] for r in good]
    result["median"] = statistics.median(rates)
    result["min"] = min(rates)
    result["max"] = max(rates)
    result["cpu_ms"] = statistics.median(r["cpu_ms_per_msg"] for r in good)
    result["gen_cpu_pct"] = max(100 * r["gen_cpu_s"] / r["seconds"] for r in good)
    result["foreign_cpu_pct"] = max(r["foreign_cpu_pct"] for r in good)
    result["runqueue_pct"] = max(
        100 * r.get("server_runqueue_s", 0.0) / r["seconds"] for r in good
    )
    result["server_cpu_pct"] = statistics.median(
        100 * r["server_cpu_s"] / r["seconds"] for r in good
    )


def idle_memory(
    spec: ServerSpec, args: argparse.Namespace, postfix: tools.Postfix, scratch: Path
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"{spec.name}-idle-", dir=scratch))
    server = Running(spec, workdir, args.server_cpu)
    try:
        server.wait_ready()
        argv = [
            sys.executable, str(BENCH / "idle_sessions.py"), "--port", str(server.port),
            "--server-pid", str(server.pid), "--sessions", str(args.idle_sessions),
        ]  # fmt: skip
        if args.gen_cpu is not None:
            argv = ["taskset", "-c", str(args.gen_cpu), *argv]
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=args.max_seconds * 3, check=False
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return {"error": f"{tail} {server.tail(2)}"}
        result: dict[str, Any] = json.loads(proc.stdout)
        log(
            f"{spec.name:15} idle: {result['per_session_kib']:.1f} KiB/session, greeting p50 "
            f"{result['greeting_loaded']['p50_ms']:.2f} ms with {result['sessions']} sessions held"
        )
        return result
    except Exception as exc:
        log(f"{spec.name} idle: {exc}")
        return {"error": str(exc)}
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def profile_qpconn(
    spec: ServerSpec,
    workload: Workload,
    args: argparse.Namespace,
    postfix: tools.Postfix,
    scratch: Path,
    out: Path,
) -> dict[str, Any]:
    """Sample the qpconn sink with py-spy while it runs one workload."""
    py_spy = tools.get_py_spy(install=not args.no_install)
    if py_spy is None:
        return {"error": "py-spy not available"}
    messages = workload.count(args.scale * args.profile_scale)
    workdir = Path(tempfile.mkdtemp(prefix="profile-", dir=scratch))
    server = Running(spec, workdir, args.server_cpu)
    raw = out / f"profile-qpconn-sink-{workload.key}.txt"
    try:
        server.wait_ready()
        warmup = min(2000, max(100, messages // 10))
        generate(postfix, server.port, workload, warmup, args.gen_cpu, args.max_seconds)
        sampler = profiling.start(py_spy, server.pid, raw, args.gen_cpu)
        time.sleep(1.0)  # let py-spy attach
        run = generate(postfix, server.port, workload, messages, args.gen_cpu, args.max_seconds)
        err = profiling.stop(sampler)
        if not raw.exists():
            return {"error": f"py-spy wrote nothing: {err.strip()[-300:]}"}
        report = profiling.summarize(raw)
        (out / f"profile-qpconn-sink-{workload.key}-summary.txt").write_text(report + "\n")
        rate = None if run["error"] else messages / run["seconds"]
        return {"messages": messages, "rate_under_profiler": rate, "raw": str(raw),
                "report": report}  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# -- the table -------------------------------------------------------------------------
def _rate_cell(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "-"
    if "median" not in cell:
        return "failed"
    text = f"{cell['median']:.0f} ({cell['min']:.0f}-{cell['max']:.0f})"
    failed = sum(1 for r in cell["runs"] if r["error"])
    return text + (f" {failed} failed" if failed else "")


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def render(report: dict[str, Any]) -> str:
    names = report["servers"]
    labels = report["labels"]
    results = report["results"]
    scale = report["scale"]
    lines = []
    header = ["", *(labels[n] for n in names)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * len(names))

    def row(title: str, cells: list[str]) -> None:
        lines.append("| " + " | ".join([title, *cells]) + " |")

    workloads = [WORKLOADS[k] for k in report["workloads"]]
    hostile_seconds = report.get("hostile", {}).get("seconds")
    for w in workloads:
        title = w.describe(scale)
        if w.attack and hostile_seconds:  # each server's own count (hostile.sized)
            title = f"{w.key}: ii ({w.sessions} conn, ~{hostile_seconds:g} s of it) under attack"
        row(
            f"{title}, msg/s",
            [_rate_cell(results.get(n, {}).get(w.key)) for n in names],
        )
    for w in workloads:
        cells = []
        for n in names:
            cell = results.get(n, {}).get(w.key) or {}
            cells.append(f"{cell['cpu_ms']:.3f}" if "cpu_ms" in cell else "-")
        row(f"server CPU ms/msg, {w.key}", cells)
    if "hostile" in report["workloads"]:
        hostile_report.render_rows(report, names, row)
    cells = []
    for n in names:
        hwm = [c.get("hwm_kib", 0) for c in results.get(n, {}).values()]
        cells.append(f"{max(hwm) / 1024:.0f}" if any(hwm) else "-")
    row("peak RSS MiB (VmHWM, max over workloads)", cells)
    idle = report.get("idle", {})
    if idle:
        count = report["idle_sessions"]
        row(
            f"RSS per idle session (EHLO sent), {count} held, KiB",
            [
                f"{idle[n]['per_session_kib']:.1f}"
                if "per_session_kib" in idle.get(n, {})
                else ("failed" if n in idle else "-")
                for n in names
            ],
        )
        row(
            f"greeting latency p50 / p99 ms with {count} held",
            [
                f"{idle[n]['greeting_loaded']['p50_ms']:.2f} / "
                f"{idle[n]['greeting_loaded']['p99_ms']:.2f}"
                if "greeting_loaded" in idle.get(n, {})
                else "-"
                for n in names
            ],
        )
    base = "qpconn-sink"
    if base in names:
        lines.append("| **qpconn-sink ÷ peer** (msg/s; CPU: peer ÷ qpconn) |" + " |" * len(names))
        for w in workloads:
            mine = results.get(base, {}).get(w.key, {}).get("median")
            row(
                f"ratio {w.key}",
                [_ratio(mine, results.get(n, {}).get(w.key, {}).get("median")) for n in names],
            )
        for w in workloads:
            mine = results.get(base, {}).get(w.key, {}).get("cpu_ms")
            row(
                f"CPU ratio {w.key}",
                [_ratio(results.get(n, {}).get(w.key, {}).get("cpu_ms"), mine) for n in names],
            )
    return "\n".join(lines)


def render_targets(report: dict[str, Any]) -> str:
    results = report["results"]
    out = []
    for name, targets in (
        ("qpconn-sink", TARGETS),
        ("qpconn-sink-fastlog", TARGETS),
        ("qpconn-maildir", MAILDIR_TARGETS),
    ):
        base = results.get(name, {})
        for key, peer, wanted in targets:
            mine = base.get(key, {}).get("median")
            theirs = results.get(peer, {}).get(key, {}).get("median")
            if not mine or not theirs:
                continue
            ratio = mine / theirs
            verdict = "met" if ratio >= wanted else "NOT met"
            out.append(f"- {key}: {name} ≥ {wanted}x {peer}: {ratio:.2f}x ({verdict})")
    out += hostile_report.render_targets(report)
    idle = report.get("idle", {}).get("qpconn-sink", {})
    if "per_session_kib" in idle:
        value = idle["per_session_kib"]
        verdict = "met" if value <= IDLE_TARGET_KIB else "NOT met"
        out.append(f"- idle session ≤ {IDLE_TARGET_KIB:.0f} KiB: {value:.1f} KiB ({verdict})")
    return "\n".join(out)


def environment(postfix: tools.Postfix | None, haraka: tools.Haraka | None) -> dict[str, str]:
    import twisted

    env = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "cpus": str(len(os.sched_getaffinity(0))),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        ),
    }
    try:
        import aiosmtpd

        env["aiosmtpd"] = aiosmtpd.__version__
    except ImportError:
        pass
    if haraka is not None:
        env["haraka"] = haraka.version()
        env["node"] = subprocess.run(
            ["node", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    if postfix is not None:
        debs = sorted((tools.CACHE / "debs").glob("postfix_*.deb"))
        env["postfix"] = debs[-1].name.split("_")[1] if debs else installed_postfix_version()
    env["loadavg"] = loadavg()
    return env


def installed_postfix_version() -> str:
    """The installed postfix package's version (when smtp-source is the system's)."""
    try:
        out = subprocess.run(
            ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True,
            timeout=10, check=False,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out or "?"


def loadavg() -> str:
    """The machine's 1, 5 and 15 minute load averages (as `uptime` shows them)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# -- main ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark qpconn against other SMTP servers (loopback only)."
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=float(os.environ.get("BENCH_SCALE", "1")),
        help="multiply every message count (0.1 for a quick run) [env BENCH_SCALE; 1]",
    )
    parser.add_argument("--runs", type=int, default=3, help="measured runs per cell [3]")
    parser.add_argument(
        "--servers",
        default=(
            "qpconn-sink,qpconn-maildir,postfix-maildir,twisted.mail,"
            "aiosmtpd,haraka,smtp-sink,qpconn-sink-2w"
        ),
        help="comma-separated servers to run [all that are available]",
    )
    parser.add_argument(
        "--workloads",
        default="i,ii,iii,iv",
        help="comma-separated, of i,ii,iii,iv,hostile (ii under attack, see README) [i,ii,iii,iv]",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=90.0, help="cap on one smtp-source run [90]"
    )
    parser.add_argument(
        "--idle-sessions", type=int, default=5000, help="sessions for the memory figure (0: skip)"
    )
    parser.add_argument(
        "--idle-servers",
        default="qpconn-sink,twisted.mail,aiosmtpd,haraka,smtp-sink",
        help="servers that get the idle-session figure [qpconn-sink and the sink peers]",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also sample qpconn-sink with py-spy"
    )
    parser.add_argument(
        "--profile-workloads", default="ii,iv", help="workloads --profile samples [ii,iv]"
    )
    parser.add_argument(
        "--profile-scale", type=float, default=1.0, help="messages for --profile, x --scale [1]"
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run the sink from another copy of qpconn (a dir holding qpconn/ and "
        "twisted/plugins/, e.g. `git archive OLD | tar -x -C DIR`) as 'qpconn-base'",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument(
        "--no-install", action="store_true", help="use only what bench/.cache already holds"
    )
    parser.add_argument("--out", default=str(BENCH / "results"), help="where reports go")
    hostile.add_arguments(parser)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of seconds: qpconn-sink only, 1%% of the messages, 1 run, "
        "100 idle sessions (shows the benchmark works; its figures mean little)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.scale = min(args.scale, 0.01)
        args.runs = 1
        args.servers = "qpconn-sink"
        args.idle_sessions = min(args.idle_sessions, 100)
        args.max_seconds = min(args.max_seconds, 30.0)
        hostile.apply_quick(args)
    if args.scale <= 0 or args.runs < 1:
        parser.error("--scale must be > 0 and --runs ≥ 1")
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if not 0 <= args.hostile_sources <= 250:
        parser.error("--hostile-sources: 0 to 250 (127.0.0.2 to 127.0.0.251)")
    pin = not args.no_pin and shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2
    cpus = sorted(os.sched_getaffinity(0))
    args.server_cpu = cpus[0] if pin else None
    args.gen_cpu = cpus[1] if pin else None
    return args


def build_specs(
    args: argparse.Namespace,
    postfix: tools.Postfix,
    haraka: tools.Haraka | None,
    wanted: list[str],
) -> dict[str, ServerSpec]:
    specs = {
        "qpconn-sink": ServerSpec("qpconn-sink", "qpconn sink", servers.qpconn_sink),
        "qpconn-sink-fastlog": ServerSpec(
            "qpconn-sink-fastlog",
            "qpconn sink, --logger=qpconn.log.observers.fast_text",
            fastlog_server.qpconn_sink_fastlog,
        ),
        "qpconn-maildir": ServerSpec(
            "qpconn-maildir", "qpconn Maildir (default)", servers.qpconn_maildir
        ),
        "twisted.mail": ServerSpec("twisted.mail", "twisted.mail sink", servers.twisted_sink),
    }
    if "aiosmtpd" in wanted and tools.ensure_module(
        "aiosmtpd", "aiosmtpd", install=not args.no_install
    ):
        import aiosmtpd

        specs["aiosmtpd"] = ServerSpec(
            "aiosmtpd", f"aiosmtpd {aiosmtpd.__version__}", servers.aiosmtpd_sink
        )
    if haraka is not None:
        specs["haraka"] = ServerSpec(
            "haraka", f"Haraka {haraka.version()} (1 proc)", servers.haraka_factory(haraka)
        )
    if args.baseline:
        baseline = Path(args.baseline).resolve()
        specs["qpconn-base"] = ServerSpec(
            "qpconn-base",
            f"qpconn sink from {args.baseline}",
            servers.from_source(baseline, servers.qpconn_sink),
        )
        specs["qpconn-maildir-base"] = ServerSpec(
            "qpconn-maildir-base",
            f"qpconn Maildir from {args.baseline}",
            servers.from_source(baseline, servers.qpconn_maildir),
        )
    if "postfix-maildir" in wanted and not servers.postfix_unusable():
        specs["postfix-maildir"] = ServerSpec(
            "postfix-maildir", "Postfix smtpd to Maildir", servers.postfix_maildir
        )
    if servers.qpconn_supports_workers():
        specs["qpconn-sink-2w"] = ServerSpec(
            "qpconn-sink-2w",
            "qpconn sink, 2 workers, unpinned",
            servers.qpconn_sink_workers(2),
            pinned=False,
            workloads=("ii",),
        )
    for name in wanted:
        variant = variants.variant_spec(name)
        if variant is not None and name not in specs:
            specs[name] = variant
    specs["smtp-sink"] = ServerSpec(
        "smtp-sink",
        "Postfix smtp-sink (C)",
        servers.smtp_sink_factory(postfix, max(256, args.idle_sessions + 500)),
    )
    return specs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers started so far are stopped (finally:).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # Children inherit this: the servers need it for the idle-session figure.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, args.idle_sessions * 2 + 1000))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    postfix = tools.get_postfix(install=not args.no_install)
    if postfix is None:
        log("Postfix's smtp-source is required as the load generator; stopping")
        return 2
    wanted = args.servers.split(",")
    if args.baseline and "qpconn-base" not in wanted:
        wanted.insert(1, "qpconn-base")
    if args.baseline and "qpconn-maildir" in wanted and "qpconn-maildir-base" not in wanted:
        wanted.insert(wanted.index("qpconn-maildir"), "qpconn-maildir-base")
    haraka = tools.get_haraka(install=not args.no_install) if "haraka" in wanted else None
    specs = build_specs(args, postfix, haraka, wanted)
    names = [n for n in wanted if n in specs]
    why = {
        "qpconn-sink-2w": "twistd qpconn has no --workers option yet",
        "haraka": "npm could not install Haraka",
        "aiosmtpd": "aiosmtpd is not installed",
        "postfix-maildir": f"no private Postfix: {servers.postfix_unusable()}",
        "qpconn-maildir-base": "only with --baseline",
    }
    for n in wanted:
        if n not in specs:
            log(f"server {n!r} skipped: {why.get(n, 'unknown server')}")
    workloads = [WORKLOADS[k] for k in args.workloads.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "scale": args.scale,
        "runs": args.runs,
        "pinned": args.server_cpu is not None,
        "environment": environment(postfix, haraka),
        "servers": names,
        "labels": {n: specs[n].label for n in names},
        "workloads": [w.key for w in workloads],
        "results": {n: {} for n in names},
        "idle_sessions": args.idle_sessions,
    }
    if any(w.attack for w in workloads):
        report["hostile"] = hostile.settings(args)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qpconn-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        # Workload by workload, the servers' runs interleaved: the ratios compare figures
        # taken seconds apart, whatever the machine's neighbours do over the whole run.
        for workload in workloads:
            cells = measure_workload([specs[n] for n in names], workload, postfix, args, scratch)
            for n in names:
                if n in cells:
                    report["results"][n][workload.key] = cells[n]
        if args.idle_sessions > 0:
            report["idle"] = {}
            for n in args.idle_servers.split(","):
                if n in specs and n in names:
                    report["idle"][n] = idle_memory(specs[n], args, postfix, scratch)
        if args.profile:
            report["profile"] = {
                key: profile_qpconn(
                    specs["qpconn-sink"], WORKLOADS[key], args, postfix, scratch, out
                )
                for key in args.profile_workloads.split(",")
            }
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["loadavg_end"] = loadavg()

    env = report["environment"]
    pinning = (
        f"server on CPU {args.server_cpu}, load generator on CPU {args.gen_cpu} (taskset)"
        if report["pinned"]
        else "not pinned"
    )
    text = [
        f"## qpconn benchmark, {env['date']}",
        "",
        f"scale {args.scale}, {args.runs} runs per cell (median, min-max), {pinning}; "
        f"load generator: Postfix {env.get('postfix', '?')} smtp-source (no pipelining, "
        f"one message per transaction); {env['cpus']} x {env['cpu']}, Python {env['python']}, "
        f"Twisted {env['twisted']}; {report['elapsed_s']:.0f} s; load average "
        f"{env['loadavg']} at the start, {report['loadavg_end']} at the end.",
        "",
        render(report),
        "",
    ]
    targets = render_targets(report)
    if targets:
        text += ["Targets of issues 6, 15 and 20 (qpconn, same run):", "", targets, ""]
    if "hostile" in report:
        text += [hostile_report.footer(report), ""]
    gen = sorted(
        (c["gen_cpu_pct"], n, k)
        for n, per in report["results"].items()
        for k, c in per.items()
        if "gen_cpu_pct" in c
    )
    if gen:
        worst = max((g for g in gen if g[1] != "smtp-sink"), default=(0.0, "-", "-"))
        text.append(
            f"smtp-source CPU use: at most {worst[0]:.0f}% against the Python and Node servers "
            f"({worst[1]}, {worst[2]}), so it was not their bottleneck"
            + (
                f"; up to {gen[-1][0]:.0f}% against smtp-sink ({gen[-1][2]}), whose figures "
                "there are the generator's limit."
                if gen[-1][1] == "smtp-sink" and gen[-1][0] >= 80
                else "."
            )
        )
    foreign = [
        part.get("foreign_cpu_pct", 0)
        for per in report["results"].values()
        for c in per.values()
        for part in (c, c.get("clean") or {})  # the hostile workload's clean runs too
    ]
    if foreign:
        text.append(
            f"Other processes on the machine used up to {max(foreign):.0f}% of a CPU during a "
            "run" + (" (quiet machine)." if max(foreign) < 10 else ": expect noise in the figures.")
        )
    waits = sorted(
        (part["runqueue_pct"], n, k)
        for n, per in report["results"].items()
        for k, c in per.items()
        for part in (c, c.get("clean") or {})
        if "runqueue_pct" in part
    )
    if waits:
        pct, name, key = waits[-1]
        text.append(
            f"The servers waited for their CPU (ready, but it was taken) at most {pct:.0f}% "
            f"of a run ({name}, {key})"
            + (": other processes were pinned to it too, expect lower msg/s." if pct >= 5
               else ".")
        )  # fmt: skip
    for key, prof in report.get("profile", {}).items():
        if "report" not in prof:
            text += ["", f"Profile of workload {key}: {prof.get('error')}"]
            continue
        rate = prof["rate_under_profiler"]
        speed = f"{rate:.0f} msg/s under py-spy" if rate else "run failed"
        text += [
            "",
            f"Profile of qpconn-sink on workload {key} ({prof['messages']} messages, {speed}); "
            f"raw stacks: {prof['raw']}",
            "",
            "```",
            prof["report"],
            "```",
        ]
    rendered = "\n".join(text)
    print(rendered)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"bench-{stamp}.md").write_text(rendered + "\n")
    (out / "latest.md").write_text(rendered + "\n")
    (out / "latest.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    log(f"report written to {out}/bench-{stamp}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
