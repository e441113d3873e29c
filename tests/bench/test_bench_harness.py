"""The benchmark harness runs end to end on a tiny load (benchmarks themselves are not tests).

It starts a real Mailroom and a real Postfix, as `make bench` does, so it needs
root (CI runs as root) and fails rather than skips without it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.interop
@pytest.mark.timeout(180)
def test_bench_runs_a_tiny_load_and_prints_its_summary_line(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the bench harness starts Postfix, which runs only as root", pytrace=False)
    out = tmp_path / "latest.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--messages", "20", "--sessions", "2", "--idle", "5",
         "--rate", "10", "--duration", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    m = re.fullmatch(r"e2e_ratio=(\d+\.\d+) p99_ms=(\d+\.\d+) idle1000_mb=(\d+\.\d+)", lines[-1])
    assert m, lines[-5:]
    assert float(m.group(1)) > 0 and float(m.group(3)) > 0
    assert any("end to end (in Maildir)" in line for line in lines)
    figures = json.loads(out.read_text())
    for system in ("Mailroom", "Postfix"):
        # Every message of each load reached its Maildir, and every idle connection was greeted.
        assert figures["load1"][system]["delivered"] == 20
        assert figures["load2"][system]["delivered"] == 20
        assert figures["load3"][system]["delivered"] == 10
        assert figures["load4"][system]["greeted"] == 5
    assert abs(figures["summary"]["p99_ms"] - float(m.group(2))) < 0.1
    # The throwaway installations (under /var/tmp: pytest's tmp_path is too deep
    # for supervisord's Unix socket path) are gone afterwards.
    where = re.search(r"installations under (\S+)", proc.stdout)
    assert where and not Path(where.group(1)).exists()
