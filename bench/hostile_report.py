"""The hostile workload's figures and table rows (see ``hostile.py``).

The probes' latencies summed up (nearest-rank p50/p99 over every probe of a cell's runs,
a failed probe counted as endless), what the server did to the attackers, the table's
rows, the targets of issue 15 and the footer that says what was run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

#: issue 15's targets for the qpconn sink under attack (measured, never assumed)
THROUGHPUT_TARGET = 0.9  # attacked msg/s ÷ clean msg/s, at least
P99_TARGET_MS = 100.0  # fresh clients' connect-to-250, below


# -- figures -------------------------------------------------------------------------------
def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (which may hold ``inf``)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarize_probes(result: dict[str, Any]) -> dict[str, Any]:
    """p50/p99 of connect-to-250, a failed probe counted as an endless one."""
    probes = result["probes"]
    values = [p["ms"] if p["ok"] else math.inf for p in probes]
    errors: dict[str, int] = {}
    for p in probes:
        if not p["ok"]:
            errors[p["error"]] = errors.get(p["error"], 0) + 1
    return {
        "n": len(probes),
        "failed": len(probes) - sum(1 for p in probes if p["ok"]),
        "errors": errors,
        "ms": [round(v, 3) if math.isfinite(v) else None for v in values],
        "greeting_ms": [round(p["greeting_ms"], 3) for p in probes if p["ok"]],
        "timeout_ms": result["timeout_ms"],
    }


def pooled_latency(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Every probe of these runs together: the p50/p99 the table shows."""
    values = [
        math.inf if ms is None else ms for run in runs for ms in run.get("probe", {}).get("ms", [])
    ]
    if not values:
        return None
    return {
        "n": len(values),
        "failed": sum(1 for v in values if not math.isfinite(v)),
        "p50_ms": percentile(values, 0.50),
        "p99_ms": percentile(values, 0.99),
        "max_ms": max(values),
    }


def summarize(cell: dict[str, Any], summarize_cell: Callable[[dict[str, Any]], None]) -> None:
    """The hostile cell's figures: the clean runs summarized like any cell, latencies
    pooled over the runs, the attackers' CPU and what the server did to them."""
    clean = cell.get("clean")
    if clean is not None:
        summarize_cell(clean)
        cell["latency_clean"] = pooled_latency(clean["runs"])
    cell["latency_attacked"] = pooled_latency(cell["runs"])
    attacks = [r["attack"] for r in cell["runs"] if "attack" in r]
    if attacks:
        cell["attacker_cpu_pct"] = max(
            100 * (a["cpu_user_s"] + a["cpu_system_s"]) / max(a["seconds"], 1e-3) for a in attacks
        )
        cell["attackers_closed"] = {
            kind: max(a["stats"][kind]["closed_by_server"] for a in attacks)
            for kind in attacks[0]["stats"]
        }
        cell["attackers_open_at_stop"] = {
            kind: min(a["open_at_stop"][kind] for a in attacks) for kind in attacks[0]["stats"]
        }
        cell["attackers_connect_failed"] = max(
            sum(s["connect_failed"] for s in a["stats"].values()) for a in attacks
        )
        # How the server closed them, over every attacked run: the replies they read.
        closed_with: dict[str, dict[str, int]] = {}
        for a in attacks:
            for kind, tally in a.get("closed_with", {}).items():
                into = closed_with.setdefault(kind, {})
                for how, count in tally.items():
                    into[how] = into.get(how, 0) + count
        cell["attackers_closed_with"] = closed_with
    rss = [r["rss_kib"] for r in cell["runs"] if r.get("rss_kib")]
    if rss:
        cell["rss_attacked_kib"] = max(rss)


def log_suffix(run: dict[str, Any]) -> str:
    """What the one-line log of a run adds for this workload."""
    parts = ["attacked" if "attack" in run else "clean"]
    latency = pooled_latency([run])
    if latency:
        parts.append(f"probe p50 {_ms(latency['p50_ms'], ' ms')} p99 "
                     f"{_ms(latency['p99_ms'], ' ms')} ({latency['failed']}/{latency['n']} "
                     "failed)")  # fmt: skip
    if "attack" in run:
        a = run["attack"]
        cpu = 100 * (a["cpu_user_s"] + a["cpu_system_s"]) / max(a["seconds"], 1e-3)
        parts.append(f"attackers CPU {cpu:.0f}%")
    return "  " + "  ".join(parts)


def _ms(value: float, unit: str = "") -> str:
    """A latency; ``failed`` for a failed probe's (endless) one."""
    return f"{value:.1f}{unit}" if math.isfinite(value) else "failed"


# -- the table -----------------------------------------------------------------------------
def render_rows(
    report: dict[str, Any], names: list[str], row: Callable[[str, list[str]], None]
) -> None:
    """The hostile workload's rows of the main table."""
    cells = [report["results"].get(n, {}).get("hostile") or {} for n in names]
    settings = report.get("hostile", {})

    def clean_rate(cell: dict[str, Any]) -> str:
        clean = cell.get("clean") or {}
        if "median" not in clean:
            return "-" if not clean else "failed"
        return f"{clean['median']:.0f} ({clean['min']:.0f}-{clean['max']:.0f})"

    def ratio(cell: dict[str, Any]) -> str:
        clean = (cell.get("clean") or {}).get("median")
        attacked = cell.get("median")
        return f"{attacked / clean:.2f}x" if clean and attacked else "-"

    def latency(key: str) -> Callable[[dict[str, Any]], str]:
        def cellfmt(cell: dict[str, Any]) -> str:
            figures = cell.get(key)
            if not figures:
                return "-"
            text = f"{_ms(figures['p50_ms'])} / {_ms(figures['p99_ms'])}"
            return text + (f" (max {_ms(figures['max_ms'])}, n={figures['n']}, "
                           f"{figures['failed']} failed)")  # fmt: skip

        return cellfmt

    def attackers(cell: dict[str, Any]) -> str:
        closed = cell.get("attackers_closed")
        if not closed:
            return "-"
        return (f"{closed['command_tricklers']} / {closed['data_tricklers']} / "
                f"{closed['non_readers']}")  # fmt: skip

    def still_open(cell: dict[str, Any]) -> str:
        left = cell.get("attackers_open_at_stop")
        if not left:
            return "-"
        return f"{left['command_tricklers']} / {left['data_tricklers']} / {left['non_readers']}"

    def duration(cell: dict[str, Any]) -> str:
        runs = [r["seconds"] for r in cell.get("runs", [])]
        clean = [r["seconds"] for r in (cell.get("clean") or {}).get("runs", [])]
        if not runs:
            return "-"
        return (f"{cell['messages']}: {max(clean, default=0):.1f} s clean, "
                f"{max(runs):.1f} s attacked (max)")  # fmt: skip

    def closed_how(cell: dict[str, Any]) -> str:
        tallies = cell.get("attackers_closed_with")
        if tallies is None:
            return "-"
        parts = []
        for kind, short in (("command_tricklers", "cmd"), ("data_tricklers", "DATA"),
                            ("non_readers", "non-readers")):  # fmt: skip
            tally = tallies.get(kind) or {}
            hows = sorted(tally.items(), key=lambda item: -item[1])
            text = "; ".join(f"{count}x `{how}`" for how, count in hows) or "none"
            parts.append(f"{short}: {text}")
        return "<br>".join(parts)

    row("hostile: messages per run, and how long the runs took", [duration(c) for c in cells])
    row("hostile: same rounds, clean ii (probe only), msg/s", [clean_rate(c) for c in cells])
    row("hostile: attacked ÷ clean msg/s", [ratio(c) for c in cells])
    row(
        "hostile: fresh client connect-to-250 p50 / p99 ms, clean",
        [latency("latency_clean")(c) for c in cells],
    )
    row(
        "hostile: fresh client connect-to-250 p50 / p99 ms, attacked",
        [latency("latency_attacked")(c) for c in cells],
    )
    row(
        "hostile: server CPU ms/msg, clean",
        [f"{c['clean']['cpu_ms']:.3f}" if "cpu_ms" in c.get("clean", {}) else "-" for c in cells],
    )
    row(
        "hostile: server RSS MiB at the end of the attacked load",
        [f"{c['rss_attacked_kib'] / 1024:.0f}" if c.get("rss_attacked_kib") else "-"
         for c in cells],
    )  # fmt: skip
    row(
        "hostile: attackers closed by the server (cmd / DATA tricklers / non-readers, max)",
        [attackers(c) for c in cells],
    )
    row(
        "hostile: how the server closed them, all attacked runs (the last reply a trickler "
        "read; non-readers read nothing: FIN or RST)",
        [closed_how(c) for c in cells],
    )
    row(
        f"hostile: attackers still connected at the end (of {settings.get('tricklers', '?')}"
        f" tricklers in halves, {settings.get('non_readers', '?')} non-readers; min)",
        [still_open(c) for c in cells],
    )
    row(
        "hostile: attackers' own CPU, % of one CPU (max over runs)",
        [f"{c['attacker_cpu_pct']:.1f}" if "attacker_cpu_pct" in c else "-" for c in cells],
    )


def render_targets(report: dict[str, Any]) -> list[str]:
    cell = report["results"].get("qpconn-sink", {}).get("hostile") or {}
    out = []
    clean = (cell.get("clean") or {}).get("median")
    attacked = cell.get("median")
    if clean and attacked:
        ratio = attacked / clean
        verdict = "met" if ratio >= THROUGHPUT_TARGET else "NOT met"
        out.append(f"- hostile: qpconn-sink keeps ≥ {THROUGHPUT_TARGET}x its clean ii msg/s: "
                   f"{ratio:.2f}x ({verdict})")  # fmt: skip
    latency = cell.get("latency_attacked")
    if latency:
        p99 = latency["p99_ms"]
        verdict = "met" if p99 < P99_TARGET_MS else "NOT met"
        out.append(f"- hostile: fresh clients' p99 < {P99_TARGET_MS:.0f} ms under attack: "
                   f"{_ms(p99, ' ms')}, {latency['failed']} of {latency['n']} probes failed "
                   f"({verdict})")  # fmt: skip
    return out


def footer(report: dict[str, Any]) -> str:
    """The attack and the probe in words, under the table."""
    s = report.get("hostile")
    if not s:
        return ""
    return (
        f"Hostile workload: the ii load (smtp-source from 127.0.0.1) with {s['tricklers']} "
        f"tricklers (one byte every {s['interval_s']} s; half in a command line, half in "
        f"DATA) and {s['non_readers']} non-readers ({s['burst']} pipelined NOOPs each, never "
        f"reading) connected from {s['source_range']} before the load starts; a server that "
        f"closes one gets it back {s['reconnect_delay_s']} s later. Fresh clients: one probe "
        f"at a time from 127.0.0.1, a new connection and one 1 KiB message each, "
        f"connect-to-250 timed, at most {s['probes_max']} per run, "
        f"{s['probe_interval_s']} s apart; a probe fails after {s['probe_timeout_s']:.0f} s "
        "and counts as endless in p99. Server CPU ms/msg under attack includes its work on "
        "the attackers."
    )
