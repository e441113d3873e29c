"""The table the benchmark prints and the summary of its last line, from several runs.

Each figure was measured once per run for each system; the table shows the
median and, in brackets, the range (lowest to highest) over the runs.  The
ratio column is the median of the per-run ratios: in each run both systems
met the load within the same minute, so a ratio is steadier on a busy machine
than either rate.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from bench import procmem

M, P = "Mailroom", "Postfix"

Run = dict[str, Any]  # one run: load name -> system name -> figures


def _nan(v: float) -> bool:
    return v != v


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not _nan(v)]
    return statistics.median(values) if values else float("nan")


def _fmt(v: float, unit: str = "") -> str:
    if v is None or _nan(v):
        return "-"
    if not unit and v == int(v):
        return f"{int(v):,}"  # counts
    text = f"{v:,.2f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{text} {unit}".rstrip()


def _cell(values: list[float], unit: str) -> str:
    if not values:
        return ""
    med = median(values)
    if len(values) == 1:
        return _fmt(med, unit)
    return f"{_fmt(med, unit)} [{_fmt(min(values))}-{_fmt(max(values))}]"


def _ratios(m: list[float], p: list[float]) -> list[float]:
    return [a / b for a, b in zip(m, p, strict=True) if b and not _nan(a) and not _nan(b)]


def render_table(runs: list[Run], listener: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    rows: list[tuple[str, str, str, str]] = []

    def series(load: str, system: str, get: Callable[[Any], float]) -> list[float]:
        return [float(get(r[load][system])) for r in runs]

    def row(label: str, load: str, get: Callable[[Any], float], unit: str) -> list[float]:
        m, p = series(load, M, get), series(load, P, get)
        ratios = _ratios(m, p)
        rows.append((label, _cell(m, unit), _cell(p, unit), _fmt(median(ratios)) if ratios else "-"))
        return ratios

    def section(title: str) -> None:
        rows.append((title, "", "", ""))

    first = runs[0]
    l1, l3, l4 = first["load1"][M], first["load3"][M], first["load4"][M]
    section(f"1. {l1.messages} x 5 KiB, {l1.sessions} sessions (higher is better)")
    row("   accepted", "load1", lambda t: t.accepted_per_s, "msg/s")
    e2e = row("   end to end (in Maildir)", "load1", lambda t: t.e2e_per_s, "msg/s")
    section(f"2. {first['load2'][M].messages} x 5 KiB, 1 session (higher is better)")
    row("   accepted", "load2", lambda t: t.accepted_per_s, "msg/s")
    one = row("   end to end (in Maildir)", "load2", lambda t: t.e2e_per_s, "msg/s")
    section(f"3. {l3.rate:g} msg/s for {l3.duration:g} s: dot sent -> file in new/ (lower is better)")
    row("   p50", "load3", lambda t: t.p50_ms, "ms")
    row("   p99", "load3", lambda t: t.p99_ms, "ms")
    row("   max", "load3", lambda t: t.max_ms, "ms")
    row("   own clock p50 (trace events / delay=)", "load3", lambda t: t.own_p50_ms, "ms")
    row("   own clock p99 (trace events / delay=)", "load3", lambda t: t.own_p99_ms, "ms")
    section(f"4. {l4.connections} idle connections: listener memory (lower is better)")
    row("   RSS (sum over listener processes)", "load4", lambda t: t.rss_mb, "MB")
    row("   PSS (shared pages split)", "load4", lambda t: t.pss_mb, "MB")
    row("   greeted connections", "load4", lambda t: t.greeted, "")
    row("   listener processes", "load4", lambda t: t.listener_processes, "")

    section("5. CPU per delivered message during load 1, from /proc (lower is better)")
    row("   all processes", "cpu", lambda c: c.total_ms_per_msg, "ms")
    _per_process_rows(rows, runs, "cpu")

    cpu_sections = [("cpu", "5. CPU per delivered message during load 1, from /proc (lower is better)")]
    if all("cpu_one_session" in r for r in runs):
        cpu_sections.append(("cpu_one_session", "   the same during load 2 (one session)"))
    by_process: dict[str, dict[str, dict[str, float]]] = {}
    for key, title in cpu_sections[1:]:
        section(title)
        row("   all processes", key, lambda c: c.total_ms_per_msg, "ms")
        _per_process_rows(rows, runs, key)
    for key, _ in cpu_sections:
        by_process[key] = {
            system: {name: median([r[key][system].per_process_ms_per_msg.get(name, 0.0) for r in runs])
                     for name in _process_names(runs, key, system)}
            for system in (M, P)
        }

    section("6. peak RSS during load 1, highest over the runs (lower is better)")
    peaks = {s: [r["load5"][s] for r in runs] for s in (M, P)}
    totals = {s: max(pk.total_kb for pk in peaks[s]) / 1024 for s in (M, P)}
    rows.append(("   all processes at once", _fmt(totals[M], "MB"), _fmt(totals[P], "MB"),
                 _fmt(totals[M] / totals[P]) if totals[P] else "-"))
    for system in (M, P):
        merged = procmem.Peaks()
        for pk in peaks[system]:
            for name, kb in pk.rss_kb.items():
                merged.rss_kb[name] = max(merged.rss_kb.get(name, 0), kb)
                merged.count[name] = max(merged.count.get(name, 0), pk.count.get(name, 1))
        for name in sorted(merged.rss_kb, key=lambda n: -merged.rss_kb[n]):
            n = merged.count.get(name, 1)
            label = f"   {system} {name}" + (f" (up to {n} at once)" if n > 1 else "")
            mb = _fmt(merged.rss_kb[name] / 1024, "MB")
            rows.append((label, mb if system == M else "", mb if system == P else "", ""))

    if listener is not None:
        section(f"7. listener alone: smtp-source -s {listener['sessions']} -m {listener['messages']},"
                " discard sinks (higher is better)")
        sinks = [s for s in ("engine", "aiosmtpd", "smtp-sink", "aiosmtpd-uvloop") if s in listener["rates_per_s"]]
        loop_of = listener.get("loops", {})
        for sink in sinks:
            on = f" ({loop_of[sink]})" if sink in loop_of else ""
            rows.append((f"   {sink}{on}", _cell(listener["rates_per_s"][sink], "msg/s"), "", ""))
        for sink in sinks:
            rows.append((f"   {sink} CPU per message", _cell(listener["cpu_ms_per_msg"][sink], "ms"), "", ""))
        rows.append(("   engine / aiosmtpd (stock, asyncio's loop)", _cell(listener["ratios"], ""), "", ""))

    checks_ratios: list[float] = []
    stall_ratios: list[float] = []
    if "checks" in first:
        section("8. DNS: the sender checks on, a local DNS server (higher is better)")
        checks_on = [float(r["checks"].e2e_per_s) for r in runs]
        checks_ratios = _ratios(checks_on, [float(r["load1"][M].e2e_per_s) for r in runs])
        rows.append(("   load 1 end to end, checks on", _cell(checks_on, "msg/s"), "", ""))
        rows.append(("   checks on / checks off (load 1)", _cell(checks_ratios, ""), "", ""))
        st = first["stall"]
        rows.append((f"   {st.messages} msgs, {st.sessions} sessions, alone",
                     _cell([float(r["stall"].alone_per_s) for r in runs], "msg/s"), "", ""))
        rows.append((f"   the same while {st.stalled_sessions} sessions wait for DNS that never answers",
                     _cell([float(r["stall"].with_stall_per_s) for r in runs], "msg/s"), "", ""))
        stall_ratios = [float(r["stall"].ratio) for r in runs]
        rows.append(("   with the stall / alone", _cell(stall_ratios, ""), "", ""))
        rows.append(("   longest wait of a stalled message for its reply",
                     _cell([float(r["stall"].stalled_max_s) for r in runs], "s"), "", ""))

    head = ("", f"{M} median [range]", f"{P} median [range]", "ratio")
    widths = [max(len(row_[i]) for row_ in [*rows, head]) for i in range(4)]
    lines = [f"{head[0]:<{widths[0]}}  {head[1]:>{widths[1]}}  {head[2]:>{widths[2]}}  {head[3]:>{widths[3]}}"]
    lines.append("-" * len(lines[0]))
    for label, m, p, ratio in rows:
        lines.append(f"{label:<{widths[0]}}  {m:>{widths[1]}}  {p:>{widths[2]}}  {ratio:>{widths[3]}}")
    summary = {
        "e2e_ratio": median(e2e),
        "one_session_ratio": median(one),
        "p99_ms": median([r["load3"][M].p99_ms for r in runs]),
        "cpu_ms_per_msg": median([r["cpu"][M].total_ms_per_msg for r in runs]),
        "postfix_cpu_ms_per_msg": median([r["cpu"][P].total_ms_per_msg for r in runs]),
        "idle1000_mb": median([r["load4"][M].rss_mb for r in runs]),
        "listener_vs_aiosmtpd": listener["listener_vs_aiosmtpd"] if listener else float("nan"),
        # Per process (medians over the runs), so a change that moves cost from one
        # process to another shows even when the total does not move.
        "cpu_ms_per_msg_by_process": _busy(by_process["cpu"][M]),
        "postfix_cpu_ms_per_msg_by_process": _busy(by_process["cpu"][P]),
        "checks_ratio": median(checks_ratios),
        "dns_stall_ratio": median(stall_ratios),
        "stall_reply_max_s": max((float(r["stall"].stalled_max_s) for r in runs if "stall" in r), default=float("nan")),
    }
    summary["cpu_kernel_ms_per_msg_by_process"] = _busy({
        name: median([r["cpu"][M].kernel_ms_per_msg.get(name, 0.0) for r in runs])
        for name in by_process["cpu"][M]
    })
    if "cpu_one_session" in by_process:
        summary["cpu_ms_per_msg_one_session"] = median([r["cpu_one_session"][M].total_ms_per_msg for r in runs])
        summary["cpu_ms_per_msg_one_session_by_process"] = _busy(by_process["cpu_one_session"][M])
    return "\n".join(lines), summary


def _process_names(runs: list[Run], key: str, system: str) -> list[str]:
    names: list[str] = []
    for r in runs:
        for name in r[key][system].per_process_ms_per_msg:
            if name not in names:
                names.append(name)
    return names


def _per_process_rows(rows: list[tuple[str, str, str, str]], runs: list[Run], key: str) -> None:
    """One row per process of each system: its CPU per message, median [range]."""
    for system in (M, P):
        names = _process_names(runs, key, system)
        per = {n: [r[key][system].per_process_ms_per_msg.get(n, 0.0) for r in runs] for n in names}
        for name in sorted(per, key=lambda n: -median(per[n])):
            if median(per[name]) < 0.005 and max(per[name]) < 0.005:
                continue  # a process that did nothing during the load
            cell = _cell(per[name], "ms")
            rows.append((f"   {system} {name}", cell if system == M else "", cell if system == P else "", ""))


def _busy(per: dict[str, float]) -> dict[str, float]:
    """The processes that did something, busiest first."""
    return {n: round(v, 3) for n, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.005}


def by_process_line(summary: dict[str, Any]) -> str:
    """The kernel's part of each process's CPU per message (load 1, Mailroom, medians),
    `cpu_ms_per_msg_by_process mda=.. mta=.. qmgr=..` (the same, all of it), and load 2's."""
    def fmt(per: dict[str, float]) -> str:
        return " ".join(f"{n.replace(' ', '_')}={v:.2f}" for n, v in per.items())

    text = "cpu_kernel_ms_per_msg_by_process " + fmt(summary.get("cpu_kernel_ms_per_msg_by_process", {}))
    text += "\ncpu_ms_per_msg_by_process " + fmt(summary.get("cpu_ms_per_msg_by_process", {}))
    if "cpu_ms_per_msg_one_session_by_process" in summary:
        text += "\none_session_cpu_ms_per_msg_by_process " + fmt(summary["cpu_ms_per_msg_one_session_by_process"])
    return text


def last_line(summary: dict[str, Any]) -> str:
    """`e2e_ratio=R one_session_ratio=S p99_ms=L cpu_ms_per_msg=C idle1000_mb=M listener_vs_aiosmtpd=X
    checks_ratio=K dns_stall_ratio=D` (one line)."""

    def f(key: str, digits: int) -> str:
        v = summary.get(key, float("nan"))
        return "-" if v is None or _nan(v) else f"{v:.{digits}f}"

    return (f"e2e_ratio={f('e2e_ratio', 2)} one_session_ratio={f('one_session_ratio', 2)}"
            f" p99_ms={f('p99_ms', 1)} cpu_ms_per_msg={f('cpu_ms_per_msg', 2)}"
            f" idle1000_mb={f('idle1000_mb', 1)} listener_vs_aiosmtpd={f('listener_vs_aiosmtpd', 2)}"
            f" checks_ratio={f('checks_ratio', 2)} dns_stall_ratio={f('dns_stall_ratio', 2)}")
