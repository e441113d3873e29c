"""The in-memory counters the daemons save for /metrics: saved whole, read back, carried on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from common import counters
from common.counters import Counters


def test_save_then_load_carries_on(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "msa.json"
    before = Counters()
    before.inc(counters.LOGIN_FAILURES, listener="127.0.0.1:2587")
    before.inc(counters.LOGIN_FAILURES, listener="127.0.0.1:2587")
    before.inc(counters.CONNECTIONS, listener="127.0.0.1:2587", result="refused")
    before.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["msa.json"]  # no temporary file left behind

    after = Counters()  # the daemon started again
    after.load(path)
    after.inc(counters.LOGIN_FAILURES, listener="127.0.0.1:2587")
    assert after.value(counters.LOGIN_FAILURES, listener="127.0.0.1:2587") == 3
    assert after.value(counters.CONNECTIONS, result="refused", listener="127.0.0.1:2587") == 1
    assert after.value(counters.CONNECTIONS, listener="127.0.0.1:2587", result="accepted") == 0


def test_a_missing_or_damaged_file_reads_as_nothing(tmp_path: Path) -> None:
    assert counters.read(tmp_path / "none.json") == []
    bad = tmp_path / "bad.json"
    bad.write_text('{"counters": [')
    assert counters.read(bad) == []
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({"counters": [{"name": "x", "labels": {}, "value": 2},
                                              {"name": "y", "value": "many"}]}))
    assert counters.read(mixed) == [{"name": "x", "labels": {}, "value": 2.0}]


def test_saved_while_running_and_once_more_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "mta.json"
    c = Counters()

    async def run() -> list[float]:
        seen = []
        async with counters.saved(path, every=0.05, counters=c):
            c.inc(counters.CONNECTIONS, listener="a", result="accepted")
            await asyncio.sleep(0.2)
            seen.append(counters.read(path)[0]["value"])
            c.inc(counters.CONNECTIONS, listener="a", result="accepted")
        seen.append(counters.read(path)[0]["value"])  # saved at the block's end, without waiting
        return seen

    assert asyncio.run(run()) == [1.0, 2.0]
