"""The table the benchmark prints (Mailroom, Postfix, ratio) and the summary of its last line."""

from __future__ import annotations

from typing import Any

from bench import procmem

M, P = "Mailroom", "Postfix"


def _ratio(a: float, b: float) -> str:
    if not b or a != a or b != b:
        return "-"
    return f"{a / b:.2f}"


def _fmt(v: float, unit: str) -> str:
    if v != v:
        return "-"
    return f"{v:,.1f} {unit}" if v < 100 else f"{v:,.0f} {unit}"


def render_table(f: dict[str, Any]) -> tuple[str, dict[str, float]]:
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, m: float, p: float, unit: str) -> None:
        rows.append((label, _fmt(m, unit), _fmt(p, unit), _ratio(m, p)))

    def section(title: str) -> None:
        rows.append((title, "", "", ""))

    l1, l2, l3, l4 = f["load1"], f["load2"], f["load3"], f["load4"]
    section(f"1. {l1[M].messages} x 5 KiB, {l1[M].sessions} sessions (higher is better)")
    row("   accepted", l1[M].accepted_per_s, l1[P].accepted_per_s, "msg/s")
    row("   end to end (in Maildir)", l1[M].e2e_per_s, l1[P].e2e_per_s, "msg/s")
    section(f"2. {l2[M].messages} x 5 KiB, 1 session (higher is better)")
    row("   accepted", l2[M].accepted_per_s, l2[P].accepted_per_s, "msg/s")
    row("   end to end (in Maildir)", l2[M].e2e_per_s, l2[P].e2e_per_s, "msg/s")
    section(f"3. {l3[M].rate:g} msg/s for {l3[M].duration:g} s: dot sent -> file in new/ (lower is better)")
    row("   p50", l3[M].p50_ms, l3[P].p50_ms, "ms")
    row("   p99", l3[M].p99_ms, l3[P].p99_ms, "ms")
    row("   max", l3[M].max_ms, l3[P].max_ms, "ms")
    row("   own clock p50 (trace events / delay=)", l3[M].own_p50_ms, l3[P].own_p50_ms, "ms")
    row("   own clock p99 (trace events / delay=)", l3[M].own_p99_ms, l3[P].own_p99_ms, "ms")
    section(f"4. {l4[M].connections} idle connections: listener memory (lower is better)")
    row("   RSS (sum over listener processes)", l4[M].rss_mb, l4[P].rss_mb, "MB")
    row("   PSS (shared pages split)", l4[M].pss_mb, l4[P].pss_mb, "MB")
    row("   greeted connections", l4[M].greeted, l4[P].greeted, "")
    row("   listener processes", l4[M].listener_processes, l4[P].listener_processes, "")
    section("5. peak RSS during load 1 (lower is better)")
    peaks: dict[str, procmem.Peaks] = f["load5"]
    row("   all processes at once", peaks[M].total_kb / 1024, peaks[P].total_kb / 1024, "MB")
    for system in (M, P):
        pk = peaks[system]
        for name in sorted(pk.rss_kb, key=lambda n: -pk.rss_kb[n]):
            n = pk.count.get(name, 1)
            label = f"   {system} {name}" + (f" (up to {n} at once)" if n > 1 else "")
            mb = pk.rss_kb[name] / 1024
            rows.append((label, _fmt(mb, "MB") if system == M else "", _fmt(mb, "MB") if system == P else "", ""))

    widths = [max(len(r[i]) for r in [*rows, ("", M, P, "ratio")]) for i in range(4)]
    lines = [f"{'':<{widths[0]}}  {M:>{widths[1]}}  {P:>{widths[2]}}  {'ratio':>{widths[3]}}"]
    lines.append("-" * len(lines[0]))
    for label, m, p, r in rows:
        lines.append(f"{label:<{widths[0]}}  {m:>{widths[1]}}  {p:>{widths[2]}}  {r:>{widths[3]}}")
    summary = {
        "e2e_ratio": l1[M].e2e_per_s / l1[P].e2e_per_s if l1[P].e2e_per_s else float("nan"),
        "p99_ms": l3[M].p99_ms,
        "idle1000_mb": l4[M].rss_mb,
    }
    return "\n".join(lines), summary
