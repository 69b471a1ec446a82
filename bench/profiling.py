"""Sampling a running server with py-spy, and summing up where its time went.

py-spy attaches to the server process and writes collapsed stacks (``--format raw``).
:func:`summarize` ranks functions by self time (samples where they were the innermost
frame) and total time (samples where they were anywhere on the stack). py-spy stops the
target for each sample (``--nonblocking`` gives torn stacks in a process this busy), so
the rate is kept low. The raw file also feeds flamegraph.pl or https://www.speedscope.app.
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def start(
    py_spy: str, pid: int, output: Path, cpu: int | None, rate: int = 100
) -> subprocess.Popen:
    argv = [
        py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(output),
        "--rate", str(rate),
    ]  # fmt: skip
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> str:
    """Stop sampling (py-spy writes its file on SIGINT); its stderr, for diagnostics."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or ""


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if "/qpconn/" in path:
        path = "qpconn/" + path.rsplit("/qpconn/", 1)[1]
    return f"{match.group('func')} ({path})"


def summarize(raw: Path, top: int = 25) -> str:
    """A text report: the top functions by self and by total samples."""
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(f) for f in stack.split(";")]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            total_counts[name] += count
        files[frames[-1].rsplit("(", 1)[-1].rstrip(")")] += count
    if not samples:
        return "no samples"
    out = [f"{samples} samples of on-CPU Python stacks"]
    out.append(f"\nTop {top} by self time (innermost frame; C calls count for their caller):")
    for name, count in self_counts.most_common(top):
        out.append(f"  {100 * count / samples:5.1f}%  {name}")
    # The reactor's trunk (twistd, run, doPoll ...) is on every stack and says nothing.
    branches = [(n, c) for n, c in total_counts.most_common() if c < 0.9 * samples]
    out.append(f"\nTop {top} by total time (anywhere on the stack; the reactor trunk left out):")
    for name, count in branches[:top]:
        out.append(f"  {100 * count / samples:5.1f}%  {name}")
    out.append("\nSelf time by file:")
    for name, count in files.most_common(15):
        out.append(f"  {100 * count / samples:5.1f}%  {name}")
    return "\n".join(out)
