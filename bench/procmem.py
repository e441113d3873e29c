"""Resident memory of processes, read from /proc, and a sampler for peaks under load.

RSS (VmRSS) counts every page a process has mapped in, shared ones too, so the
RSS of 1,000 forked Postfix smtpd processes adds the same library pages 1,000
times.  PSS (smaps_rollup) splits each shared page between its sharers, so a
sum of PSS is what a group of processes really costs.  We report both.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmRSS")


def hwm_kb(pid: int) -> int:
    """Peak RSS since the process started (the kernel's high-water mark)."""
    return _status_kb(pid, "VmHWM")


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def name_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/PID/task/*/children)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            out.extend(int(p) for p in text.split())
    except OSError:
        pass
    return out


@dataclass
class Peaks:
    """Per process name: the highest RSS seen (kB) and how many such processes at once."""

    rss_kb: dict[str, int] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    total_kb: int = 0  # the largest sum over all processes at one sample
    samples: int = 0


class Sampler:
    """Samples the RSS of a changing set of processes every `interval` seconds."""

    def __init__(self, pids: Callable[[], dict[int, str]], interval: float = 0.1) -> None:
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self.peaks = Peaks()
        self._thread = threading.Thread(target=self._loop, name="rss", daemon=True)

    def __enter__(self) -> Sampler:
        # Start every high-water mark afresh, so the peaks are this load's and not
        # a start-up spike (writing 5 to clear_refs resets VmHWM; Linux 4.0+).
        for pid in self._pids():
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sample()  # long-lived processes: their high-water marks cover any gap

    def _sample(self, use_hwm: bool = True) -> None:
        p = self.peaks
        total = 0
        counts: dict[str, int] = {}
        for pid, name in self._pids().items():
            kb = hwm_kb(pid) if use_hwm and self._stop.is_set() else rss_kb(pid)
            if not kb:
                continue
            total += rss_kb(pid)
            counts[name] = counts.get(name, 0) + 1
            p.rss_kb[name] = max(p.rss_kb.get(name, 0), kb)
        for name, n in counts.items():
            p.count[name] = max(p.count.get(name, 0), n)
        p.total_kb = max(p.total_kb, total)
        p.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample(use_hwm=False)
