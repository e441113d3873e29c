"""`mailroom queue`: list (text and --json), show, flush, hold, release, delete, bounce."""

from __future__ import annotations

import contextlib
import datetime as dt
import email
import email.policy
import io
import json
import re
from typing import Any

import pytest
from sqlalchemy import select, update

from cli.main import main as mailroom_main
from common.clock import SystemClock
from common.log import new_trace_id
from common.models import Message, Recipient
from mta import queue
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(60)

BODY = b"From: carol@sender.test\r\nSubject: stuck\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    return Installation(tmp_path_factory.mktemp("queue") / "m")


def _cli(inst: Installation, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = mailroom_main(["--config", str(inst.config_path), *args])
    return code, out.getvalue(), err.getvalue()


def _enqueue(inst: Installation, rcpts: list[str], sender: str = "carol@sender.test", age: float = 600) -> str:
    trace = new_trace_id()
    db = inst.db()
    then = SystemClock().now() - dt.timedelta(seconds=age)
    with db.write() as s:
        queue.enqueue(s, trace=trace, sender=sender, body=BODY, now=then,
                      recipients=[queue.QueuedRecipient(r, r) for r in rcpts])
        s.flush()
        s.execute(update(Recipient).where(Recipient.message_id == trace).values(
            attempts=2, last_reply="451 4.4.1 Cannot connect to 127.0.0.7:25: refused",
            next_attempt=then + dt.timedelta(hours=1)))
        s.commit()
    db.close()
    return trace


def _row(inst: Installation, trace: str) -> tuple[Message, list[Recipient]]:
    db = inst.db()
    try:
        with db.read() as s:
            m = s.get(Message, trace)
            assert m is not None
            return m, list(s.scalars(select(Recipient).where(Recipient.message_id == trace)))
    finally:
        db.close()


def _listed(inst: Installation) -> dict[str, Any]:
    code, out, _ = _cli(inst, "queue", "--json")
    assert code == 0
    return {m["id"]: m for m in json.loads(out)}


def test_list_json_and_text(inst: Installation) -> None:
    trace = _enqueue(inst, ["x@far.test", "y@far.test"])
    item = _listed(inst)[trace]
    assert item["sender"] == "carol@sender.test" and item["size"] == len(BODY)
    assert 590 <= item["age"] <= 700
    assert [r["address"] for r in item["recipients"]] == ["x@far.test", "y@far.test"]
    r = item["recipients"][0]
    assert set(r) == {"address", "state", "attempts", "next_attempt", "last_reply"}
    assert (r["state"], r["attempts"]) == ("queued", 2)
    assert r["last_reply"] == "451 4.4.1 Cannot connect to 127.0.0.7:25: refused"
    dt.datetime.fromisoformat(r["next_attempt"])
    code, out, _ = _cli(inst, "queue")
    assert code == 0 and trace in out and "451 4.4.1 Cannot connect" in out and "<carol@sender.test>" in out
    code, out, _ = _cli(inst, "queue", "show", trace, "--json")
    assert code == 0 and [m["id"] for m in json.loads(out)] == [trace]
    code, out, _ = _cli(inst, "queue", "show", trace)
    assert code == 0 and "x@far.test" in out and "tries=2" in out
    assert _cli(inst, "queue", "show", "0" * 18)[0] == 1


def test_flush_makes_it_due_now(inst: Installation) -> None:
    trace = _enqueue(inst, ["x@far.test"])
    _, [r] = _row(inst, trace)
    assert r.next_attempt > SystemClock().now()
    code, out, _ = _cli(inst, "queue", "flush", trace)
    assert code == 0 and out.startswith("1 recipient")
    _, [r] = _row(inst, trace)
    assert r.next_attempt <= SystemClock().now()


def test_hold_and_release(inst: Installation) -> None:
    trace = _enqueue(inst, ["x@far.test"])
    _cli(inst, "queue", "flush", trace)
    assert _cli(inst, "queue", "hold", trace)[0] == 0
    assert _listed(inst)[trace]["held"] is True
    db = inst.db()
    try:
        with db.write() as s:  # the queue manager's claim passes it by
            assert trace not in [j.trace for j in queue.claim(s, "test:1", SystemClock().now())]
        assert _cli(inst, "queue", "release", trace)[0] == 0
        with db.write() as s:
            assert trace in [j.trace for j in queue.claim(s, "test:1", SystemClock().now())]
            queue.release_stale(s, "test")
    finally:
        db.close()
    assert _cli(inst, "queue", "hold", "0" * 18)[0] == 1


def test_delete_is_silent(inst: Installation) -> None:
    trace = _enqueue(inst, ["x@far.test"])
    before = _bounces(inst)
    assert _cli(inst, "queue", "delete", trace)[0] == 0
    m, [r] = _row(inst, trace)
    assert r.state == "deleted" and m.body is None
    assert trace not in _listed(inst)
    assert _bounces(inst) == before  # nobody is told
    assert _cli(inst, "queue", "delete", trace)[0] == 1


def _bounces(inst: Installation) -> list[Message]:
    db = inst.db()
    try:
        with db.read() as s:
            return list(s.scalars(select(Message).where(Message.is_bounce.is_(True))))
    finally:
        db.close()


def test_bounce_returns_it_to_the_sender_now(inst: Installation) -> None:
    trace = _enqueue(inst, ["x@far.test", "y@far.test"])
    before = {m.id for m in _bounces(inst)}
    assert _cli(inst, "queue", "bounce", trace)[0] == 0
    _, rcpts = _row(inst, trace)
    assert {r.state for r in rcpts} == {"bounced"}
    [dsn] = [m for m in _bounces(inst) if m.id not in before]
    _, [to] = _row(inst, dsn.id)
    assert dsn.sender == "" and to.address == "carol@sender.test" and to.state == "queued"
    assert dsn.body is not None
    msg = email.message_from_bytes(dsn.body, policy=email.policy.default)
    blocks = list(msg.iter_parts())[1].get_payload()
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; x@far.test", "rfc822; y@far.test"]
    assert all(b["Action"] == "failed" for b in blocks[1:])
    assert trace not in _listed(inst)
    # A message from <> is bounced without a DSN.
    silent = _enqueue(inst, ["z@far.test"], sender="")
    before = {m.id for m in _bounces(inst)}
    assert _cli(inst, "queue", "bounce", silent)[0] == 0
    assert {m.id for m in _bounces(inst)} == before


def test_ages_and_flush_in_lab_time(tmp_path_factory: pytest.TempPathFactory) -> None:
    """In a lab the daemons stamp lab time; `mailroom queue` counts ages from lab now, not the system's."""
    from common.clock import SystemClock as System
    from common.clock import WarpedClock

    lab = Installation(tmp_path_factory.mktemp("labqueue") / "m")
    since = System().now() - dt.timedelta(hours=1)  # lab time is now 60 lab hours ahead
    lab.config_path.write_text(lab.config_path.read_text() + (
        f'\n[lab]\ntime_warp = 60\ntime_warp_since = "{since.isoformat(timespec="seconds")}"\n'))
    lab_clock = WarpedClock(System(), 60, since.replace(microsecond=0))
    trace = new_trace_id()
    received = lab_clock.now() - dt.timedelta(minutes=10)  # as the MTA stamped it, ten lab minutes ago
    db = lab.db()
    with db.write() as s:
        queue.enqueue(s, trace=trace, sender="carol@sender.test", body=BODY, now=received,
                      recipients=[queue.QueuedRecipient("dave@far.test", "dave@far.test")])
        s.flush()
        s.execute(update(Recipient).where(Recipient.message_id == trace).values(
            next_attempt=received + dt.timedelta(hours=1)))
        s.commit()

    r = lab.cli("queue", "--json")  # its own process: the lab clock it sets stays there
    assert r.returncode == 0, r.stderr
    [item] = json.loads(r.stdout)
    # Ten lab minutes, plus a lab minute per real second the command took to start.
    assert 600 <= item["age"] < 600 + 60 * 30, item["age"]
    text = lab.cli("queue").stdout
    m = re.search(r" age (\d+)m ", text)
    assert m and 10 <= int(m.group(1)) <= 40, text

    assert lab.cli("queue", "flush").returncode == 0
    with db.read() as s:
        [due] = s.scalars(select(Recipient.next_attempt).where(Recipient.message_id == trace))
    # Due at lab now: after the reception, long after the system's now.
    assert received < due and due - System().now() > dt.timedelta(hours=50)
