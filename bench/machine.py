"""What the benchmark ran on and at which commit, so that a run can be compared and redone.

The fsync latency is measured here, on the disk the installations use: it is
the floor under every durable 250 (Mailroom's fsync'd commit, Postfix's
fsync'd queue file) and differs tenfold between disks.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fsync_ms(folder: Path, writes: int = 200) -> dict[str, float]:
    """Median and p99 of one 4 KiB write + fsync on `folder`'s disk, in milliseconds."""
    block = os.urandom(4096)
    took: list[float] = []
    with tempfile.NamedTemporaryFile(dir=folder, prefix="fsync-") as f:
        fd = f.fileno()
        for _ in range(writes):
            t = time.perf_counter()
            os.pwrite(fd, block, 0)
            os.fsync(fd)
            took.append((time.perf_counter() - t) * 1000)
    took.sort()
    return {"median_ms": statistics.median(took), "p99_ms": took[int(len(took) * 0.99) - 1]}


def postfix_version() -> str:
    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    try:
        out = subprocess.run([postconf, "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=20)
    except OSError:
        return "not installed"
    return out.stdout.strip() or "unknown"


def commit() -> dict[str, Any]:
    """The commit measured, and whether the work tree had changes on top of it."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20)
        return out.stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except OSError:
        return {"commit": "unknown", "branch": "unknown", "dirty": False}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def describe(workdir: Path) -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": os.uname().release,
        "python": platform.python_version(),
        "postfix": postfix_version(),
        "fsync_4k": fsync_ms(workdir),
        "workdir": str(workdir),
        "loadavg_at_start": loadavg(),
        **commit(),
    }
