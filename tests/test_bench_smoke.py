"""The benchmark still runs: ``bench/run.py --quick`` against qpconn, a few seconds long.

It checks that the benchmark works end to end (the server starts under twistd, every
workload completes, the idle-session figure is taken, the table is printed), never how
fast anything is: figures from a test run mean nothing. It needs Postfix's smtp-source,
either installed (the postfix package) or unpacked by an earlier ``bench/run`` into
bench/.cache; without it the test is skipped, as the benchmark itself is not part of
the suite.

The hostile workload gets the same check (``--quick --workloads hostile``: the attackers,
the probe, both runs, the table's rows), plus what it promises about cleaning up: no
attacker, probe or server process outlives the benchmark, nor a Ctrl-C in the middle of an
attack.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def smtp_source_available() -> bool:
    """Where bench/tools.py looks for it (it checks that it runs; the bench says if not)."""
    unpacked = BENCH / ".cache" / "postfix" / "usr" / "sbin" / "smtp-source"
    return unpacked.exists() or Path("/usr/sbin/smtp-source").exists()


pytestmark = pytest.mark.skipif(
    not smtp_source_available(),
    reason="Postfix's smtp-source is neither installed nor in bench/.cache (run bench/run once)",
)


def test_quick_benchmark_runs_every_workload_and_the_idle_figure(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--no-install", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "latest.json").read_text())
    assert report["servers"] == ["qpconn-sink"]
    cells = report["results"]["qpconn-sink"]
    assert sorted(cells) == ["i", "ii", "iii", "iv"]
    for key, cell in cells.items():
        assert "error" not in cell, (key, cell)
        assert [run["error"] for run in cell["runs"]] == [None], (key, cell["runs"])
        assert cell["median"] > 0 and cell["cpu_ms"] >= 0
        assert cell["hwm_kib"] > 1024  # a live Python process, read from /proc
    idle = report["idle"]["qpconn-sink"]
    assert idle["sessions"] == 100 and "per_session_kib" in idle, idle
    # The printed table is the one the README describes.
    assert "| i: 1 conn, 20 x 1 KiB, msg/s |" in proc.stdout
    assert "RSS per idle session (EHLO sent), 100 held, KiB" in proc.stdout


def leftover_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (this test's scratch dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def gone(pid: int) -> bool:
    """No live process ``pid`` runs the hostile workload's clients (a reused pid is not it)."""
    try:
        return b"hostile_clients" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def test_quick_hostile_workload_reports_both_runs_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "results"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = subprocess.run(
        [
            sys.executable, str(BENCH / "run.py"), "--quick", "--no-install",
            "--workloads", "hostile", "--idle-sessions", "0", "--out", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        # The servers' work dirs go under scratch: any process left behind names it.
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(scratch)},
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "latest.json").read_text())
    assert report["workloads"] == ["hostile"]
    assert report["hostile"]["tricklers"] == 20 and report["hostile"]["non_readers"] == 4
    assert report["hostile"]["source_range"] == "127.0.0.2-127.0.0.25"
    cell = report["results"]["qpconn-sink"]["hostile"]
    assert "error" not in cell, cell
    assert [run["error"] for run in cell["runs"]] == [None]
    assert [run["error"] for run in cell["clean"]["runs"]] == [None]
    assert cell["median"] > 0 and cell["clean"]["median"] > 0
    for key in ("latency_clean", "latency_attacked"):
        latency = cell[key]
        assert latency["n"] >= 5, (key, latency)  # the probe's minimum count
        assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"], (key, latency)
    attacked = cell["runs"][0]
    assert "attack" not in cell["clean"]["runs"][0]  # the clean run had no attackers
    stats = attacked["attack"]["stats"]
    # qpconn's default config has no connection limits: every attacker got in.
    assert stats["command_tricklers"]["connected"] >= 10, stats
    assert stats["data_tricklers"]["connected"] >= 10, stats
    assert stats["non_readers"]["connected"] >= 4, stats
    assert cell["attacker_cpu_pct"] >= 0
    for run in (attacked, cell["clean"]["runs"][0]):
        assert gone(run["probe_pid"])
    assert gone(attacked["attacker_pid"])
    assert leftover_processes(str(scratch)) == []
    # The table rows the README describes.
    assert "| hostile: ii (50 conn, 200 x 1 KiB) under attack, msg/s |" in proc.stdout
    assert "| hostile: same rounds, clean ii (probe only), msg/s |" in proc.stdout
    assert "| hostile: fresh client connect-to-250 p50 / p99 ms, attacked |" in proc.stdout
    assert "- hostile: qpconn-sink keeps ≥ 0.9x its clean ii msg/s: " in proc.stdout
    assert "- hostile: fresh clients' p99 < 100 ms under attack: " in proc.stdout


#: holds an attack on a qpconn sink until interrupted, as bench/run does around a run
INTERRUPTED = """
import pathlib, sys, time
sys.path.insert(0, sys.argv[1])
import hostile, run, servers
args = run.parse_args(["--quick"])
spec = servers.ServerSpec("qpconn-sink", "qpconn sink", servers.qpconn_sink)
server = servers.Running(spec, pathlib.Path(sys.argv[2]), None)
try:
    server.wait_ready()
    with hostile.around_load(server, args, attack=True) as extra:
        print(server.pid, extra["attacker_pid"], extra["probe_pid"], flush=True)
        for _ in range(1200):  # bounded: the test interrupts it long before
            time.sleep(0.1)
finally:
    server.stop()
"""


def test_ctrl_c_during_an_attack_stops_the_attackers_the_probe_and_the_server(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED, str(BENCH), str(tmp_path / "server")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the attack is up (bounded by the finally's kill)
        assert line, proc.stderr.read() if proc.poll() is not None else "no output"
        server_pid, attacker_pid, probe_pid = (int(x) for x in line.split())
        assert not gone(attacker_pid) and not gone(probe_pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "KeyboardInterrupt" in err, err[-2000:]
    assert gone(attacker_pid) and gone(probe_pid)
    # The server's command line names its work dir under tmp_path, as would a straggler's.
    assert leftover_processes(str(tmp_path)) == [], server_pid
