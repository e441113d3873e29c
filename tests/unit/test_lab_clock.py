"""Lab time: a clock that runs faster from a fixed start, and the settings that turn it on."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from common import config as configmod
from common.clock import FakeClock, SystemClock, WarpedClock, for_lab, rate

START = dt.datetime(2026, 12, 1, 18, 0, 0)


def test_warped_clock_runs_faster_from_its_start() -> None:
    base = FakeClock(START)
    lab = WarpedClock(base, 3600, START)
    assert lab.now() == START
    base.advance(1)  # one real second ...
    assert lab.now() == START + dt.timedelta(hours=1)  # ... is one lab hour
    base.advance(119)
    assert lab.now() - START == dt.timedelta(days=5)  # the five-day queue lifetime in two minutes
    assert lab.monotonic() == base.monotonic() == 120  # timeouts and rate windows stay real


def test_two_processes_agree_on_lab_time() -> None:
    # A message stamped by the MTA and aged by the queue manager: both count from `since`.
    base = FakeClock(START + dt.timedelta(minutes=10))
    mta, qmgr = WarpedClock(base, 60, START), WarpedClock(base, 60, START)
    received = mta.now()
    base.advance(4 * 60)  # four real minutes at 60x
    assert qmgr.now() - received == dt.timedelta(hours=4)


def test_a_queue_managers_lease_lasts_as_long_in_real_time_in_the_lab() -> None:
    # The lease is real time (how long a frozen holder keeps its recipients); its
    # expiry is written in lab time.  At the lab's speed a 60 s lease that were not
    # scaled would expire before any delivery ended, and the queue manager would take
    # its own recipients over and drop its results, again and again.
    from mta.qmgr import QueueManager

    lab = WarpedClock(FakeClock(START), 3600, START)
    assert rate(lab) == 3600 and rate(SystemClock()) == rate(FakeClock(START)) == 1
    qm = QueueManager(db=None, clock=lab, policy=None, local_domains=[], hostname="mail.test",  # type: ignore[arg-type]
                      local=None, remote=None, lease=60)  # type: ignore[arg-type]
    assert qm.lease == 60 and qm.lease_in_clock == 60 * 3600


def test_for_lab() -> None:
    assert isinstance(for_lab(1.0, ""), SystemClock)
    clock = for_lab(600, "2026-12-01T18:00:00")
    assert isinstance(clock, WarpedClock) and clock.speed == 600 and clock.since == START
    with pytest.raises(ValueError):
        WarpedClock(SystemClock(), 0, START)


def _config(lab: str) -> configmod.Config:
    return configmod.from_dict(
        {"mailroom": {"domains": ["example.org"]}, **configmod.tomllib.loads(lab)}, Path("/nowhere/mailroom.toml")
    )


def test_lab_settings() -> None:
    cfg = _config('[lab]\nenabled = true\ntime_warp = 3600\ntime_warp_since = "2026-12-01T18:00:00"')
    assert cfg.lab.enabled and cfg.lab.time_warp == 3600.0
    assert _config("").lab.time_warp == 1.0 and not _config("").lab.enabled


@pytest.mark.parametrize(("lab", "error"), [
    ("[lab]\ntime_warp = 60", "lab.time_warp_since: needed when lab.time_warp is not 1"),
    ("[lab]\ntime_warp = 0", "lab.time_warp: expected a positive number"),
    ('[lab]\ntime_warp = "fast"', "lab.time_warp: expected a positive number"),
    ('[lab]\ntime_warp = 60\ntime_warp_since = "yesterday"', "lab.time_warp_since:"),
    ('[lab]\ndns = "nowhere"', "lab.dns:"),
    ('[lab]\nenabled = true\ndns = ""', "lab.dns: the lab needs"),
])
def test_bad_lab_settings_name_the_key(lab: str, error: str) -> None:
    with pytest.raises(configmod.ConfigError, match=error):
        _config(lab)
