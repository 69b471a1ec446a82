"""The benchmark still runs: ``bench/run.py --quick`` against qpconn, a few seconds long.

It checks that the benchmark works end to end (the server starts under twistd, every
workload completes, the idle-session figure is taken, the table is printed), never how
fast anything is: figures from a test run mean nothing. It needs Postfix's smtp-source,
either installed (the postfix package) or unpacked by an earlier ``bench/run`` into
bench/.cache; without it the test is skipped, as the benchmark itself is not part of
the suite.
"""

from __future__ import annotations

import json
import os
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
