"""`mailroom queue`: list (text and --json), show, flush, hold, release, delete, bounce."""

from __future__ import annotations

import contextlib
import datetime as dt
import email
import email.policy
import io
import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, update

from cli.main import main as mailroom_main
from common.clock import SystemClock
from common.log import new_trace_id
from common.models import Event, Message, Recipient
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


@pytest.fixture
def qmgr(inst: Installation) -> Iterator[socket.socket]:
    """What a running queue manager offers the command: its wake-up socket (run/qmgr.sock)."""
    path = inst.config.qmgr_socket
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def _woken(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(64))
        except BlockingIOError:
            return got


def _events(inst: Installation, trace: str) -> list[str]:
    db = inst.db()
    try:
        with db.read() as s:
            return list(s.scalars(select(Event.event).where(Event.trace_id == trace).order_by(Event.id)))
    finally:
        db.close()


def test_flush_makes_it_due_now(inst: Installation, qmgr: socket.socket) -> None:
    trace = _enqueue(inst, ["x@far.test"])
    _, [r] = _row(inst, trace)
    assert r.next_attempt > SystemClock().now()
    code, out, _ = _cli(inst, "queue", "flush", trace)
    assert code == 0 and out == "1 recipient(s) due now; the queue manager is trying them\n", out
    _, [r] = _row(inst, trace)
    assert r.next_attempt <= SystemClock().now()
    assert _woken(qmgr)  # and the queue manager was told


def test_flush_with_the_queue_manager_stopped_says_so(inst: Installation) -> None:
    """Not "1 recipient(s) due now" when nothing will try them: the command says why, and fails."""
    inst.config.qmgr_socket.unlink(missing_ok=True)
    trace = _enqueue(inst, ["x@far.test"])
    code, out, err = _cli(inst, "queue", "flush", trace)
    assert code == 1 and out == "", out
    assert "nothing is tried now: the queue manager is not running" in err and "`mailroom start qmgr`" in err, err
    _, [r] = _row(inst, trace)
    assert r.next_attempt <= SystemClock().now()  # due: tried as soon as it starts
    # A socket file nobody listens on (a queue manager killed) is the same.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(inst.config.qmgr_socket))
    stale.close()
    code, _, err = _cli(inst, "queue", "flush")
    assert code == 1 and "the queue manager is not running" in err, err
    inst.config.qmgr_socket.unlink()


def test_flush_of_a_held_message_tries_nothing_and_says_it_is_held(inst: Installation, qmgr: socket.socket) -> None:
    trace = _enqueue(inst, ["x@far.test"])
    assert _cli(inst, "queue", "hold", trace)[0] == 0
    _, [before] = _row(inst, trace)
    _woken(qmgr)
    code, out, err = _cli(inst, "queue", "flush", trace)
    assert code == 1 and out == "" and err == (f"{trace} is held: nothing is tried "
                                               f"(`mailroom queue release {trace}` first)\n"), err
    _, [after] = _row(inst, trace)
    assert after.next_attempt == before.next_attempt and not _woken(qmgr)
    # Flushing everything leaves it waiting too, and says so.
    code, out, _ = _cli(inst, "queue", "flush")
    assert code == 0 and "held message(s) left waiting" in out, out
    _, [after] = _row(inst, trace)
    assert after.next_attempt == before.next_attempt
    assert _cli(inst, "queue", "release", trace)[0] == 0


def test_hold_and_release(inst: Installation, qmgr: socket.socket) -> None:
    trace = _enqueue(inst, ["x@far.test", "y@far.test"])
    _cli(inst, "queue", "flush", trace)
    code, out, _ = _cli(inst, "queue", "hold", trace)
    assert code == 0 and out == f"{trace} held: its 2 recipient(s) wait until `mailroom queue release {trace}`\n"
    assert _listed(inst)[trace]["held"] is True
    # Again: said, nothing recorded, and the message is as asked (exit 0).
    events = _events(inst, trace)
    code, out, _ = _cli(inst, "queue", "hold", trace)
    assert (code, out) == (0, f"{trace} is already held: nothing changed\n")
    assert _events(inst, trace) == events and events.count("held") == 1
    db = inst.db()
    try:
        with db.write() as s:  # the queue manager's claim passes it by
            assert trace not in [j.trace for j in queue.claim(s, "test:1", SystemClock().now())]
        code, out, _ = _cli(inst, "queue", "release", trace)
        assert code == 0 and out.startswith(f"{trace} released: its 2 recipient(s) are tried"), out
        assert (_cli(inst, "queue", "release", trace)[:2]) == (0, f"{trace} is already not held: nothing changed\n")
        assert _events(inst, trace).count("released") == 1
        with db.write() as s:
            assert trace in [j.trace for j in queue.claim(s, "test:1", SystemClock().now())]
            queue.release_stale(s, "test")
    finally:
        db.close()
    code, _, err = _cli(inst, "queue", "hold", "0" * 18)
    assert code == 1 and err == f"{'0' * 18}: not in the queue\n"


def test_delete_tells_nobody(inst: Installation) -> None:
    trace = _enqueue(inst, ["x@far.test"])
    before = _bounces(inst)
    code, out, _ = _cli(inst, "queue", "delete", trace)
    assert code == 0 and out == f"{trace} deleted: 1 recipient(s) taken out of the queue; nobody is told\n", out
    m, [r] = _row(inst, trace)
    assert r.state == "deleted" and m.body is None
    assert trace not in _listed(inst)
    assert _bounces(inst) == before  # nobody is told
    code, _, err = _cli(inst, "queue", "delete", trace)
    assert code == 1 and "not in the queue" in err


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
    code, out, _ = _cli(inst, "queue", "bounce", trace)
    assert code == 0 and out.startswith(f"{trace} returned to sender: 2 recipient(s) bounced; a delivery status "
                                        "notification goes to <carol@sender.test>"), out
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
    code, out, _ = _cli(inst, "queue", "bounce", silent)
    assert code == 0 and "no notification: it is itself a notification" in out, out
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

    flushed = lab.cli("queue", "flush")  # no queue manager runs here: said, and the recipient is due
    assert flushed.returncode == 1 and "the queue manager is not running" in flushed.stderr, flushed.stderr
    with db.read() as s:
        [due] = s.scalars(select(Recipient.next_attempt).where(Recipient.message_id == trace))
    # Due at lab now: after the reception, long after the system's now.
    assert received < due and due - System().now() > dt.timedelta(hours=50)
