"""The daily jobs' clock (cli/schedule.py): when each runs next, and which are planned."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cli.schedule import Job, jobs
from common import config as configmod


def test_next_run_is_today_if_still_ahead_else_tomorrow() -> None:
    job = Job("backup", "03:30", ("backup",))
    assert job.next_run(dt.datetime(2026, 12, 1, 2, 0)) == dt.datetime(2026, 12, 1, 3, 30)
    assert job.next_run(dt.datetime(2026, 12, 1, 3, 30)) == dt.datetime(2026, 12, 2, 3, 30)  # just ran
    assert job.next_run(dt.datetime(2026, 12, 31, 23, 59)) == dt.datetime(2027, 1, 1, 3, 30)
    assert Job("x", "12:00:05", ()).next_run(dt.datetime(2026, 12, 1, 12, 0)) == dt.datetime(2026, 12, 1, 12, 0, 5)


def test_only_what_the_config_asks_for_is_planned(tmp_path: Path) -> None:
    raw: dict[str, dict[str, object]] = {"mailroom": {"domains": ["example.org"]}, "dmarc": {"reports": False}}
    assert jobs(configmod.from_dict(raw, tmp_path / "m.toml")) == []
    cfg = configmod.from_dict({**raw, "backup": {"at": "03:30"}}, tmp_path / "m.toml")
    assert [(j.name, j.at, j.argv) for j in jobs(cfg)] == [("backup", "03:30", ("backup",))]
    default = configmod.from_dict({"mailroom": {"domains": ["example.org"]}}, tmp_path / "m.toml")
    assert [(j.name, j.at, j.argv) for j in jobs(default)] == [("dmarc reports", "00:15", ("dmarc", "report"))]
