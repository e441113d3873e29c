"""The daemons' event loop: uvloop unless MAILROOM_EVENT_LOOP=asyncio, and nothing else."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop

from common.daemon import LOOP_VARIABLE, loop_choice, loop_factory, run_event_loop
from common.privileges import StartError

REPO = Path(__file__).resolve().parents[2]


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_uvloop_unless_told_otherwise() -> None:
    assert loop_choice({}) == "uvloop"
    assert loop_choice({LOOP_VARIABLE: ""}) == "uvloop"
    assert loop_choice({LOOP_VARIABLE: "asyncio"}) == "asyncio"
    loop = loop_factory({})()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    loop = loop_factory({LOOP_VARIABLE: "asyncio"})()
    try:
        assert not isinstance(loop, uvloop.Loop)
        assert isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()


def test_an_unknown_loop_is_refused_naming_the_variable() -> None:
    with pytest.raises(StartError, match="MAILROOM_EVENT_LOOP=tokio: must be one of uvloop, asyncio"):
        loop_choice({LOOP_VARIABLE: "tokio"})


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_run_event_loop_runs_on_the_chosen_loop(monkeypatch: pytest.MonkeyPatch, choice: str) -> None:
    monkeypatch.setenv(LOOP_VARIABLE, choice)
    loop = run_event_loop(_running_loop())
    assert isinstance(loop, uvloop.Loop) == (choice == "uvloop")


def test_a_daemon_with_an_unknown_loop_says_so_in_one_line_and_exits(tmp_path: Path) -> None:
    from tests.support.suite import Installation

    inst = Installation(tmp_path / "mailroom")
    env = {**os.environ, LOOP_VARIABLE: "tokio"}
    r = subprocess.run([sys.executable, "-m", "mda", "--config", str(inst.config_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 78, r.stderr
    assert r.stderr.strip().splitlines() == ["mda: MAILROOM_EVENT_LOOP=tokio: must be one of uvloop, asyncio"]
