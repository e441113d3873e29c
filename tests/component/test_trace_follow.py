"""`mailroom trace --follow ID` as a real process over a real database: it stops by itself at the
message's final outcome, and an ID that names nothing is reported unknown after a short grace
(a message still on its way in is waited for)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import update

from cli.trace import FOLLOW_GRACE
from common.events import EventName, Hop
from common.log import new_trace_id
from common.models import Recipient, add_event, utcnow
from mta import queue
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[2]


def _follow(inst: Installation, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--config", str(inst.config_path), "trace", "--follow", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )


def _enqueue(inst: Installation, trace: str, rcpts: list[str]) -> None:
    db = inst.db()
    try:
        with db.write() as s:
            queue.enqueue(s, trace=trace, sender="carol@example.org", body=b"Subject: x\r\n\r\nhi\r\n", now=utcnow(),
                          recipients=[queue.QueuedRecipient(r, r) for r in rcpts])
            s.commit()
    finally:
        db.close()


def _settle(inst: Installation, trace: str, rcpt: str, state: str) -> None:
    db = inst.db()
    try:
        with db.write() as s:
            s.execute(update(Recipient).where(Recipient.message_id == trace, Recipient.address == rcpt)
                      .values(state=state))
            add_event(s, trace, Hop.QMGR, EventName(state), recipient=rcpt, detail=f"{state} for the test")
            s.commit()
    finally:
        db.close()


def test_follow_stops_at_the_final_outcome_of_every_recipient(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "m")
    trace = new_trace_id()
    _enqueue(inst, trace, ["x@far.test", "y@far.test"])
    proc = _follow(inst, trace)
    try:
        time.sleep(1.5)
        _settle(inst, trace, "x@far.test", "delivered")
        time.sleep(1.5)
        assert proc.poll() is None  # one recipient is still waiting: it goes on
        _settle(inst, trace, "y@far.test", "bounced")
        out, err = proc.communicate(timeout=20)  # before: it never ended
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert "mta  queued" in lines[0] and "qmgr delivered <x@far.test>" in lines[1], lines
    assert "qmgr bounced   <y@far.test>" in lines[2], lines
    assert lines[-1] == "-- final: <x@far.test> delivered, <y@far.test> bounced", lines

    # A message already at its end: its past, then the end at once (also as JSON).
    again = subprocess.run(
        [sys.executable, "-m", "cli.main", "--config", str(inst.config_path), "trace", "--follow", trace, "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=30)
    assert again.returncode == 0 and len(again.stdout.splitlines()) == 3, again


def test_follow_of_an_unknown_id_says_so_after_a_grace(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "m")
    started = time.monotonic()
    proc = _follow(inst, "NOPE")
    try:
        out, err = proc.communicate(timeout=FOLLOW_GRACE + 20)  # before: it waited for ever, silently
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1 and out == ""
    assert err == f"NOPE: no such message (waited {FOLLOW_GRACE:g} s for it to arrive)\n"
    assert time.monotonic() - started >= FOLLOW_GRACE


def test_follow_waits_for_a_message_still_on_its_way_in(tmp_path: Path) -> None:
    """Its id is known (the MSA logs it from MAIL FROM on) before the MTA has queued it."""
    inst = Installation(tmp_path / "m")
    trace = new_trace_id()
    proc = _follow(inst, trace)
    try:
        time.sleep(3)
        assert proc.poll() is None
        _enqueue(inst, trace, ["x@far.test"])
        _settle(inst, trace, "x@far.test", "delivered")
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "-- final: <x@far.test> delivered"
