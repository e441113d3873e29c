"""`mailroom trace --follow` prints hops while they happen, and `log_format = "json"`
makes every process log one JSON object per line with the trace id as a field."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.suite import Installation, maildir_messages, running

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def json_suite(installation: Installation) -> Iterator[Installation]:
    installation.set("mailroom", "log_format", '"json"')
    yield from running(installation)


class Follower:
    """`mailroom trace --follow ...` as a real process, its lines read as they come."""

    def __init__(self, inst: Installation, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "--config", str(inst.config_path), "trace", "--follow", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, pattern: str, timeout: float = 30.0) -> list[str]:
        """Lines read until one matches `pattern` (that one included)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, f"trace --follow ended: {seen}"
                continue
            seen.append(line)
            if re.search(pattern, line):
                return seen
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s: {seen}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.reader.join(10)  # it reads to the end of the pipe
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def test_trace_follow_and_json_logs(json_suite: Installation) -> None:
    suite = json_suite
    everyone = Follower(suite)  # every message, from now on
    try:
        everyone.until("following every message from now on")
        code, text = suite.submit("alice@example.org", ["alice@example.org"], b"Subject: follow\r\n\r\nhi\r\n")
        assert code == 250
        m = re.search(rb"queued as ([0-9A-F]{18})", text)
        assert m, text
        trace = m.group(1).decode()
        lines = everyone.until(rf"{trace} mda\s+delivered <alice@example.org>")
        hops = [line.split()[2] for line in lines if trace in line]
        assert {"msa", "mta", "mda"} <= set(hops), lines
        # The queue manager's line for the same delivery comes after the MDA's.
        everyone.until(rf"{trace} qmgr delivered <alice@example.org>")
    finally:
        everyone.stop()

    # One message, as JSON: its past first, then whatever comes (here: nothing more), to its end.
    one = Follower(suite, trace, "--json")
    try:
        first = one.until(r'"event": "queued"')
        events = [json.loads(x) for x in first]
        assert all(e["trace"] == trace for e in events)
        rest = one.until(r'"hop": "qmgr", "event": "delivered"')
        assert all(json.loads(x)["trace"] == trace for x in rest)
        assert one.proc.wait(20) == 0  # every recipient has its outcome: it ends by itself
    finally:
        one.stop()
    suite.wait_for(lambda: len(maildir_messages(suite.mailbox("alice@example.org"))) == 1, what="delivery")

    # The processes' own log lines: JSON objects, the trace id a field of its own.
    records = []
    for line in suite.log_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    by_process: dict[str, list[dict[str, object]]] = {}
    for r in records:
        assert {"time", "process", "pid", "level", "message"} <= r.keys(), r
        by_process.setdefault(str(r["process"]), []).append(r)
    for process in ("msa", "mta", "qmgr", "mda"):
        assert any(r.get("trace_id") == trace for r in by_process.get(process, [])), process
    # No line of the suite's programs is in the text format any more.
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (msa|mta|qmgr|mda|web)\[", suite.log_text(), re.M)
