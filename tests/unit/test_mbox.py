"""mboxrd writing (mda/mbox.py): quoting, the From_ line, locking and the quota, on real files."""

from __future__ import annotations

import errno
import mailbox
import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mda import mbox
from mda.quota import QuotaExceeded

pytestmark = pytest.mark.timeout(20)


@pytest.mark.parametrize(("line", "stored"), [
    (b"From x", b">From x"),
    (b">From x", b">>From x"),
    (b">>>From x", b">>>>From x"),
    (b"From", b"From"),
    (b"Fromage", b"Fromage"),
    (b" From x", b" From x"),
    (b"X>From x", b"X>From x"),
    (b">Fro", b">Fro"),
])
def test_mboxrd_quotes_from_lines(line: bytes, stored: bytes) -> None:
    assert mbox.quote(b"a\n" + line + b"\nb\n") == b"a\n" + stored + b"\nb\n"
    assert mbox.quote(line + b"\n") == stored + b"\n"
    assert mbox.unquote(stored + b"\n") == line + b"\n"


@given(st.lists(st.sampled_from([b"From ", b">", b"x", b" ", b"\n", b">From "]), max_size=30).map(b"".join))
def test_unquote_undoes_quote(body: bytes) -> None:
    quoted = mbox.quote(body)
    assert mbox.unquote(quoted) == body
    assert not any(line.startswith(b"From ") for line in quoted.split(b"\n"))


def test_from_line_uses_asctime_in_utc_and_mailer_daemon_for_the_null_sender() -> None:
    when = 1700000000.0  # Tue Nov 14 22:13:20 2023 UTC
    assert mbox.from_line("a@example.org", when) == b"From a@example.org Tue Nov 14 22:13:20 2023\n"
    assert mbox.from_line("", when) == b"From MAILER-DAEMON Tue Nov 14 22:13:20 2023\n"


def test_entries_end_with_a_blank_line_even_without_a_final_newline() -> None:
    assert mbox.entry(b"Subject: x\n\nbody\n", "a@b", 0).endswith(b"\nbody\n\n")
    assert mbox.entry(b"Subject: x\n\nbody", "a@b", 0).endswith(b"\nbody\n\n")


def test_deliver_appends_and_python_reads_each_message(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "box.mbox"
    bodies = [b"Subject: 1\n\nFrom a\n", b"Subject: 2\n\n>From b\n\n", b"Subject: 3\n\n"]
    old = os.umask(0o077)  # the MDA's (common/privileges.py)
    try:
        for b in bodies:
            mbox.deliver(path, b, "a@example.org")
    finally:
        os.umask(old)
    assert not path.with_name("box.mbox.lock").exists()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    box = mailbox.mbox(path, create=False)
    try:
        assert [mbox.unquote(box.get_bytes(k)) for k in box.iterkeys()] == bodies
    finally:
        box.close()


def test_a_stale_dotlock_is_broken_and_a_fresh_one_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "box.mbox"
    lock = tmp_path / "box.mbox.lock"
    lock.write_text("1\n")
    with pytest.raises(mbox.LockTimeout):
        mbox.deliver(path, b"Subject: x\n\n", "a@b", lock_timeout=0.2)
    assert lock.exists() and not path.exists()
    old = time.time() - mbox.STALE_DOTLOCK_SECONDS - 10
    os.utime(lock, (old, old))
    mbox.deliver(path, b"Subject: x\n\n", "a@b", lock_timeout=0.2)
    assert not lock.exists() and path.read_bytes().count(b"\nSubject: x\n") == 1


def test_a_full_disk_at_the_dotlock_leaves_no_lock_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a full disk the dotlock's file is created but its one line is refused.
    path = tmp_path / "box.mbox"
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        mbox.deliver(path, b"Subject: refused\n\n", "a@b", delivery_id="d1")
    monkeypatch.setattr(os, "write", real_write)
    assert not path.with_name("box.mbox.lock").exists()
    # Space is back: the next delivery takes the lock at once, not after the stale timeout.
    assert mbox.deliver(path, b"Subject: stored\n\n", "a@b", delivery_id="d1", lock_timeout=1) is True
    assert _messages(path) == [b"Subject: stored\n\n"]


def test_the_quota_is_checked_against_the_file_size(tmp_path: Path) -> None:
    path = tmp_path / "box.mbox"
    size = len(mbox.entry(b"Subject: x\n\n" + b"x" * 100 + b"\n", "a@b", 0))
    for _ in range(2):
        mbox.deliver(path, b"Subject: x\n\n" + b"x" * 100 + b"\n", "a@b", quota_limit=2 * size)
    before = path.read_bytes()
    with pytest.raises(QuotaExceeded):
        mbox.deliver(path, b"Subject: y\n\n", "a@b", quota_limit=2 * size)
    assert path.read_bytes() == before
    assert not (tmp_path / "box.mbox.lock").exists()


# --- idempotence: a redelivery of the same message stores nothing ----------------


def _messages(path: Path) -> list[bytes]:
    box = mailbox.mbox(path, create=False)
    try:
        return [mbox.unquote(box.get_bytes(k)) for k in box.iterkeys()]
    finally:
        box.close()


def test_a_redelivery_under_the_same_id_stores_nothing(tmp_path: Path) -> None:
    path = tmp_path / "box.mbox"
    assert mbox.deliver(path, b"Subject: 1\n\nFrom me\n", "a@b", delivery_id="d1") is True
    assert mbox.deliver(path, b"Subject: 2\n\n", "a@b", delivery_id="d2") is True
    assert mbox.deliver(path, b"Subject: 1\n\nFrom me\n", "a@b", delivery_id="d1") is False
    assert _messages(path) == [b"Subject: 1\n\nFrom me\n", b"Subject: 2\n\n"]
    # Without an id (or with another one) the same bytes are a new message.
    assert mbox.deliver(path, b"Subject: 2\n\n", "a@b", delivery_id="d3") is True
    assert len(_messages(path)) == 3


def test_an_id_in_the_journal_whose_entry_never_reached_the_mbox_is_delivered(tmp_path: Path) -> None:
    path = tmp_path / "box.mbox"
    mbox.deliver(path, b"Subject: first\n\n", "a@b", delivery_id="d1")
    # A crash after the journal line and before the append: another message then
    # took the offset the journal names.
    journal = tmp_path / ".box.mbox.delivered"
    journal.write_bytes(journal.read_bytes() + f"lost {path.stat().st_size}\n".encode())
    mbox.deliver(path, b"Subject: other\n\n", "a@b", delivery_id="d2")
    assert mbox.deliver(path, b"Subject: lost\n\n", "a@b", delivery_id="lost") is True
    assert _messages(path) == [b"Subject: first\n\n", b"Subject: other\n\n", b"Subject: lost\n\n"]


def test_a_reader_rewriting_the_mbox_does_not_make_a_delivery_look_done(tmp_path: Path) -> None:
    path = tmp_path / "box.mbox"
    mbox.deliver(path, b"Subject: 1\n\n", "a@b", delivery_id="d1")
    mbox.deliver(path, b"Subject: 2\n\n", "a@b", delivery_id="d2")
    path.write_bytes(mbox.entry(b"Subject: 2\n\n", "a@b", 0))  # the user expunged the first
    # d2 moved to offset 0: it is not where the journal says, so it is stored again
    # (a rare duplicate, never a loss); d1 is gone from the file and comes back.
    assert mbox.deliver(path, b"Subject: 1\n\n", "a@b", delivery_id="d1") is True


_KILLER = r"""
import os, signal, sys
from pathlib import Path
from mda import mbox

step = sys.argv[2]
real_write, real_fsync = os.write, os.fsync

def target(fd):
    # Which file a write goes to (the dotlock's pid line is neither).
    name = os.readlink(f"/proc/self/fd/{fd}")
    return "journal" if name.endswith(".delivered") else "mbox" if name.endswith(".mbox") else "other"

def write(fd, data):
    if target(fd) == "journal" and step == "after-journal":
        real_write(fd, data); real_fsync(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    if target(fd) == "mbox" and step == "mid-append":
        real_write(fd, bytes(data)[: len(data) // 2]); real_fsync(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(fd, data)

def fsync(fd):
    real_fsync(fd)
    if step == "after-append" and target(fd) == "mbox":
        os.kill(os.getpid(), signal.SIGKILL)

os.write, os.fsync = write, fsync
mbox.deliver(Path(sys.argv[1]), b"Subject: killed\n\n" + b"x" * 5000 + b"\n", "a@b", delivery_id="k1")
"""


@pytest.mark.parametrize("step", ["after-journal", "mid-append", "after-append"])
def test_a_kill_at_any_step_then_a_redelivery_leaves_exactly_one_copy(tmp_path: Path, step: str) -> None:
    import signal
    import subprocess
    import sys

    path = tmp_path / "box.mbox"
    mbox.deliver(path, b"Subject: before\n\n", "a@b", delivery_id="d0")
    child = subprocess.run(
        [sys.executable, "-c", _KILLER, str(path), step],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, timeout=15,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    # The queue manager never saw a 250, so it delivers again.
    killed = b"Subject: killed\n\n" + b"x" * 5000 + b"\n"
    mbox.deliver(path, killed, "a@b", delivery_id="k1")
    mbox.deliver(path, b"Subject: after\n\n", "a@b", delivery_id="d2")
    assert _messages(path) == [b"Subject: before\n\n", killed, b"Subject: after\n\n"]


def test_threads_breaking_a_dead_writers_dotlock_together_append_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An MDA killed while it held the dotlock leaves it behind.  After the restart two
    # delivery threads find it together; the later one must not remove the fresh lock
    # the first took meanwhile (fcntl does not keep threads of one process apart), or
    # both append at once and one journals the wrong offset: its redelivery (the
    # queue manager never saw the 250) then stores a second copy.
    import contextlib
    import subprocess
    import sys
    import threading

    path = tmp_path / "box.mbox"
    mbox.deliver(path, b"Subject: before\n\n", "a@b", delivery_id="d0")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.with_name("box.mbox.lock").write_text(f"{dead.pid}\n")
    real_gone, real_fcntl = mbox._holder_gone, mbox._fcntl_lock
    both_looked = threading.Barrier(2)

    def slow_gone(lock_path: Path) -> bool:
        # Both threads read the dead writer's pid; the second acts on it a little
        # later, when the first has already put its own lock in place.
        gone = real_gone(lock_path)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_looked.wait(timeout=1)  # never met when only one thread gets this far
        if threading.current_thread().name == "second":
            time.sleep(0.1)
        return gone

    def slow_fcntl(fd: int, deadline: float) -> None:
        real_fcntl(fd, deadline)
        time.sleep(0.3)  # hold the lock while the other thread looks at the dotlock

    monkeypatch.setattr(mbox, "_holder_gone", slow_gone)
    monkeypatch.setattr(mbox, "_fcntl_lock", slow_fcntl)
    bodies = {"first": b"Subject: one\n\n" + b"1" * 300 + b"\n", "second": b"Subject: two\n\n" + b"2" * 30 + b"\n"}
    threads = [
        threading.Thread(target=mbox.deliver, args=(path, body, "a@b"), kwargs={"delivery_id": name}, name=name)
        for name, body in bodies.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(mbox, "_fcntl_lock", real_fcntl)
    # Both are redelivered: each is found where the journal says, and stored once.
    for name, body in bodies.items():
        assert mbox.deliver(path, body, "a@b", delivery_id=name) is False
    assert sorted(_messages(path)) == sorted([b"Subject: before\n\n", *bodies.values()])


def test_an_empty_dotlock_left_by_a_killed_writer_is_broken_soon(tmp_path: Path) -> None:
    # Killed between creating the dotlock and writing its pid: it names nobody, and
    # must not hold up the mailbox for the whole stale timeout.
    path = tmp_path / "box.mbox"
    lock = path.with_name("box.mbox.lock")
    lock.touch()
    with pytest.raises(mbox.LockTimeout):
        mbox.deliver(path, b"Subject: x\n\n", "a@b", lock_timeout=0.2)  # it may be being written
    old = time.time() - mbox.EMPTY_DOTLOCK_SECONDS - 1
    os.utime(lock, (old, old))
    assert mbox.deliver(path, b"Subject: x\n\n", "a@b", lock_timeout=1) is True
    assert not lock.exists()


def test_a_message_torn_by_a_kill_is_cut_before_the_next_message_is_appended(tmp_path: Path) -> None:
    # Killed in the middle of the append; another message comes before the
    # redelivery of the torn one.  Left in place, the torn part would stay in
    # the mailbox as a message of its own, and the redelivery add a second copy.
    import signal
    import subprocess
    import sys

    path = tmp_path / "box.mbox"
    mbox.deliver(path, b"Subject: before\n\n", "a@b", delivery_id="d0")
    child = subprocess.run(
        [sys.executable, "-c", _KILLER, str(path), "mid-append"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, timeout=15,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    mbox.deliver(path, b"Subject: other\n\n", "a@b", delivery_id="d2")
    killed = b"Subject: killed\n\n" + b"x" * 5000 + b"\n"
    mbox.deliver(path, killed, "a@b", delivery_id="k1")
    assert _messages(path) == [b"Subject: before\n\n", b"Subject: other\n\n", killed]


def test_a_reader_shortening_the_mbox_is_never_cut(tmp_path: Path) -> None:
    # A reader expunged the first message (the file is rewritten shorter): the end
    # of the file may now fall inside the span the journal gives the last append,
    # but it ends with a whole message, so nothing is cut.
    path = tmp_path / "box.mbox"
    mbox.deliver(path, b"Subject: first\n\n" + b"f" * 400 + b"\n", "a@b", delivery_id="d0")
    mbox.deliver(path, b"Subject: second\n\n", "a@b", delivery_id="d1")
    mbox.deliver(path, b"Subject: third\n\n" + b"t" * 800 + b"\n", "a@b", delivery_id="d2")
    box = mailbox.mbox(path)
    box.lock()
    box.remove(next(iter(box.keys())))
    box.flush()
    box.unlock()
    box.close()
    mbox.deliver(path, b"Subject: fourth\n\n", "a@b", delivery_id="d3")
    assert [m.split(b"\n", 1)[0] for m in _messages(path)] == [
        b"Subject: second", b"Subject: third", b"Subject: fourth"
    ]


def test_a_dotlock_whose_pid_now_belongs_to_a_younger_process_is_broken(tmp_path: Path) -> None:
    # The MDA that made the dotlock was killed, and its pid went to a new process
    # (pids wrap round fast when daemons restart often): that process is alive but
    # is not the holder, so the mailbox must not wait out the stale timeout.
    import subprocess
    import sys

    path = tmp_path / "box.mbox"
    lock = path.with_name("box.mbox.lock")
    lock.touch()
    made = time.time() - 10
    os.utime(lock, (made, made))
    younger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(f"{younger.pid}\n")
        os.utime(lock, (made, made))
        assert mbox.deliver(path, b"Subject: x\n\n", "a@b", lock_timeout=1) is True
        # A live holder older than its dotlock is still waited for.
        lock.write_text(f"{younger.pid}\n")
        with pytest.raises(mbox.LockTimeout):
            mbox.deliver(path, b"Subject: y\n\n", "a@b", lock_timeout=0.3)
    finally:
        younger.kill()
        younger.wait()
