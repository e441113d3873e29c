"""The scheduled backup: supervisord's `schedule` program runs `mailroom backup` at
`[backup] at`, and its outcome shows on `mailroom status` and /metrics."""

from __future__ import annotations

import datetime as dt
import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.suite import Installation, running

pytestmark = pytest.mark.timeout(180)


def test_the_backup_runs_at_its_time_and_says_how_it_went(installation: Installation) -> None:
    inst = installation
    assert inst.cli("backup", "init").returncode == 0
    status_file = inst.config.run_dir / "backup.json"
    for suite in running(inst):
        # The program reads the config when it starts: restarted alone, it plans the new time
        # (a few seconds ahead, however long the whole suite took to start).
        soon = (dt.datetime.now() + dt.timedelta(seconds=12)).strftime("%H:%M:%S")
        suite.set("backup", "at", f'"{soon}"')
        assert suite.cli("restart", "schedule").returncode == 0
        assert not status_file.exists()
        status = suite.cli("status").stdout
        assert "schedule" in status and f"backup: none yet; daily at {soon}" in status, status
        suite.wait_for(status_file.exists, timeout=90, what="the scheduled backup")
        outcome = json.loads(status_file.read_text())
        assert outcome["ok"] is True, outcome
        assert list((inst.root / "backup" / "snapshots").iterdir())
        assert f"backup: ok {outcome['snapshot']}" in suite.cli("status").stdout
        assert "backup: done: snapshot" in suite.log_text()
        url = f"http://127.0.0.1:{suite.ports['listen']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        assert families["mailroom_backup_last_run_ok"].samples[0].value == 1.0
        assert families["mailroom_backup_last_success_timestamp_seconds"].samples[0].value == outcome["last_ok"]
