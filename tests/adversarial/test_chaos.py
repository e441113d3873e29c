"""The chaos run at test size: 300 messages, a daemon killed with SIGKILL every half second,
nothing lost and nothing doubled."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import chaos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_kill_9_during_traffic_loses_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = chaos.run(messages=300, clients=20, kill_every=0.5, drain_timeout=120,
                       root=tmp_path / "mailroom", seed=6)
    out = capsys.readouterr().out
    summary = re.search(
        r"^accepted=(\d+) delivered=(\d+) lost=(\d+) duplicates=(\d+) indoubt_delivered=(\d+)/(\d+)$", out, re.M
    )
    assert summary, out
    accepted, delivered, lost, duplicates, _, _ = map(int, summary.groups())
    assert lost == 0 and delivered == accepted and duplicates == 0, out
    assert accepted > 150, out  # the run did real work, not just fail fast
    kills = re.search(r"^kills: (\d+)", out, re.M)
    assert kills and int(kills.group(1)) >= 5, out  # every daemon gets killed more than once on average
    assert status == 0, out
