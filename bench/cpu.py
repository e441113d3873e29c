"""CPU time of a system's processes over a load, read from /proc, per delivered message.

For every process of a system we read utime + stime (its own CPU) and cutime +
cstime (the CPU of its children that have exited and been waited for) from
/proc/PID/stat.  Summing all four over every live process, before and after a
load, and taking the difference counts each CPU second exactly once, even for
processes that start and end during the load: Postfix's smtpd, cleanup and
virtual processes come and go, and what they used lands in master's cutime
when master reaps them.  A process alive at the start that exits during the
load is counted in its parent's cutime at the end, minus what it had used at
the start.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def times(pid: int) -> tuple[float, float, float]:
    """(own CPU seconds, CPU seconds of waited-for children, own seconds in the kernel)
    of `pid`; zeros when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0, 0.0
    # Fields after the parenthesised command name start at field 3 (state);
    # utime stime cutime cstime are fields 14-17.
    f = text[text.rindex(")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / TICK, (int(f[13]) + int(f[14])) / TICK, int(f[12]) / TICK


@dataclass
class Snapshot:
    """CPU seconds per process name (own), and the waited-for children's CPU per parent name."""

    own: dict[str, float] = field(default_factory=dict)
    children: dict[str, float] = field(default_factory=dict)
    kernel: dict[str, float] = field(default_factory=dict)  # the part of `own` spent in system calls

    @property
    def total(self) -> float:
        return sum(self.own.values()) + sum(self.children.values())


def snapshot(processes: Callable[[], dict[int, str]]) -> Snapshot:
    snap = Snapshot()
    for pid, name in processes().items():
        own, kids, kernel = times(pid)
        snap.own[name] = snap.own.get(name, 0.0) + own
        snap.children[name] = snap.children.get(name, 0.0) + kids
        snap.kernel[name] = snap.kernel.get(name, 0.0) + kernel
    return snap


@dataclass
class CpuUse:
    """CPU milliseconds per delivered message over one load: in total and per process name."""

    delivered: int
    total_ms_per_msg: float
    # Own CPU per process name; "exited children of X" holds what processes that
    # ended during the load used (for Postfix: most smtpd, cleanup, virtual).
    per_process_ms_per_msg: dict[str, float]
    # Of each process's own CPU, the part in the kernel (system calls: fsync, send,
    # link...): what no change to our Python can remove, only fewer calls.
    kernel_ms_per_msg: dict[str, float] = field(default_factory=dict)


def use(before: Snapshot, after: Snapshot, delivered: int) -> CpuUse:
    n = max(1, delivered)
    per: dict[str, float] = {}
    for name in sorted(set(before.own) | set(after.own)):
        per[name] = (after.own.get(name, 0.0) - before.own.get(name, 0.0)) * 1000 / n
    for name in sorted(set(before.children) | set(after.children)):
        d = after.children.get(name, 0.0) - before.children.get(name, 0.0)
        if d > 0:
            per[f"exited children of {name}"] = d * 1000 / n
    # A process that ended during the load leaves a negative own delta that its
    # parent's children delta makes up: the total stays right either way.
    kernel = {name: (after.kernel.get(name, 0.0) - before.kernel.get(name, 0.0)) * 1000 / n for name in after.kernel}
    return CpuUse(delivered=delivered, total_ms_per_msg=(after.total - before.total) * 1000 / n,
                  per_process_ms_per_msg=per, kernel_ms_per_msg=kernel)
